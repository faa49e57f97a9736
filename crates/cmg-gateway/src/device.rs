//! The device side (DESIGN §4): TLS with the CMG's server certificate, the device certificate
//! learnt once per connection, and per request: the URL map, the certificate, the token, then a
//! relay through a tunnel with the identity the gateway verified.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cmg_proto::mp::relay;
use cmg_proto::tunnel::CREDENTIAL_LENGTH;
use http_body_util::{BodyExt, Limited};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::server::conn::http2;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use rustls::pki_types::{CertificateDer, UnixTime};

use crate::error::{Body, Denial, RelayError, json_response};
use crate::limits::AcceptFailures;
use crate::pki::{self, Verdict};
use crate::policy::{self, CachedAuth, Identity, Route};
use crate::stats::{METADATA, UNMAPPED};
use crate::{Shared, unix_now};
use crate::{crl, h1};

/// Largest request body a device may send (inventory reports included).
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// How long a request may take to arrive and be answered (to the response head).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a TLS handshake, or the head of an HTTP/1.1 request, may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Request line and headers of an HTTP/1.1 request (a client token is about 1 KiB).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Header fields in one HTTP/1.1 request.
pub const MAX_HEADERS: usize = 64;

/// What the TLS handshake established about a device connection.
#[derive(Debug)]
pub(crate) struct Peer {
    pub remote: SocketAddr,
    /// base64url SHA-256 of the client certificate, as it goes through the tunnel; the
    /// handshake proved the key.
    pub thumbprint: Option<HeaderValue>,
    /// The certificate chain the device sent: its certificate, then any intermediates (kept
    /// for path building).
    pub chain: Vec<CertificateDer<'static>>,
    /// The token verified on this connection.
    pub verified: Mutex<Option<CachedAuth>>,
    /// The chain and CRL verdict on this connection's certificate.
    pub pki: Mutex<Option<CachedPki>>,
}

impl Peer {
    fn thumbprint(&self) -> Option<&str> {
        self.thumbprint.as_ref().and_then(|t| t.to_str().ok())
    }
}

/// A PKI verdict remembered on a connection, valid for one settings version and CRL generation.
#[derive(Debug, Clone)]
pub(crate) struct CachedPki {
    version: i64,
    generation: u64,
    verdict: Verdict,
}

/// Limits on HTTP/1.1 device requests (HTTP/2 ones are hyper's).
const H1_LIMITS: h1::Limits = h1::Limits {
    max_head_bytes: MAX_HEAD_BYTES,
    max_headers: MAX_HEADERS,
    max_body_bytes: MAX_BODY_BYTES,
    head_timeout: HANDSHAKE_TIMEOUT,
    body_timeout: REQUEST_TIMEOUT,
    write_timeout: REQUEST_TIMEOUT,
};

pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    // Every connection task holds a clone of `busy` until it ends, so that shutdown can wait
    // for them. HTTP/1.1 is served by `h1` (no buffer held while idle), HTTP/2 by hyper.
    let (busy, mut done) = mpsc::channel::<()>(1);
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new());
    let mut failures = AcceptFailures::new("device connection");
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    if let Some(line) = failures.record(Instant::now(), &e) {
                        shared.handler_log.warn(&line);
                    }
                    // At the open-file limit every accept fails until a connection closes.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let _ = tcp.set_nodelay(true);
        let tls = shared.device_acceptor();
        let shared = Arc::clone(&shared);
        let h2 = h2.clone();
        let busy = busy.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return tracing::debug!(%remote, "TLS handshake failed: {e}"),
                Err(_) => return tracing::debug!(%remote, "TLS handshake timed out"),
            };
            let (_, tls) = stream.get_ref();
            let chain: Vec<CertificateDer<'static>> = tls
                .peer_certificates()
                .map(|chain| chain.iter().map(|c| c.clone().into_owned()).collect())
                .unwrap_or_default();
            let speaks_h2 = tls.alpn_protocol() == Some(b"h2");
            let open = shared.stats.connection_opened(speaks_h2);
            // base64url is always a valid header value.
            let thumbprint = chain
                .first()
                .and_then(|cert| HeaderValue::try_from(cmg_pki::thumbprint_sha256(cert)).ok());
            let peer = Arc::new(Peer {
                remote,
                thumbprint,
                chain,
                verified: Mutex::new(None),
                pki: Mutex::new(None),
            });
            // Each protocol in a task of its own, which this one (and its handshake state)
            // leaves: a task serving both would have room for both state machines, and every
            // idle HTTP/1.1 connection would carry over a kilobyte of HTTP/2's (measured by the
            // bench's idle part).
            let ended = move |ended: Result<(), String>| {
                drop((open, busy));
                if let Err(e) = ended {
                    tracing::debug!(%remote, "device connection ended: {e}");
                }
            };
            if speaks_h2 {
                tokio::spawn(async move {
                    ended(serve_h2(&h2, stream, stop, shared, peer).await);
                });
            } else {
                tokio::spawn(async move {
                    let served = h1::serve(stream, &H1_LIMITS, stop, |request| {
                        handle(Arc::clone(&shared), Arc::clone(&peer), request)
                    })
                    .await;
                    ended(served.map_err(|e| e.to_string()));
                });
            }
        });
    }
    drop(listener);
    drop(busy);
    // `None` once every connection has dropped its sender.
    if tokio::time::timeout(REQUEST_TIMEOUT, done.recv())
        .await
        .is_err()
    {
        tracing::warn!("some device connections were still busy at shutdown and were closed");
    }
}

/// When an HTTP/2 connection last finished a request, and how many it is answering.
#[derive(Debug)]
struct H2Activity {
    opened: Instant,
    /// Milliseconds after `opened`.
    last: AtomicU64,
    in_flight: AtomicUsize,
}

impl H2Activity {
    fn touch(&self) {
        let now = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, Ordering::Relaxed);
    }

    /// Counts a request as in flight until the returned guard is dropped (answered, or
    /// abandoned by the device).
    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(self))
    }

    /// How long the connection has had nothing to answer (zero while it answers something).
    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.opened.elapsed().saturating_sub(last)
    }
}

struct InFlight(Arc<H2Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves an HTTP/2 device connection until it ends. Like an HTTP/1.1 one it is closed (GOAWAY,
/// in-flight requests finished) after `HANDSHAKE_TIMEOUT` without a request, and at shutdown:
/// an idle HTTP/2 connection costs the gateway about 32 KiB.
async fn serve_h2(
    h2: &http2::Builder<TokioExecutor>,
    stream: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    mut stop: watch::Receiver<bool>,
    shared: Arc<Shared>,
    peer: Arc<Peer>,
) -> Result<(), String> {
    let activity = Arc::new(H2Activity {
        opened: Instant::now(),
        last: AtomicU64::new(0),
        in_flight: AtomicUsize::new(0),
    });
    let seen = Arc::clone(&activity);
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let in_flight = seen.begin();
        // Boxed: hyper moves the stream's future into a task of its own, and a pointer is
        // cheaper to move than the request's 2.8 KB future.
        let answer = Box::pin(handle(Arc::clone(&shared), Arc::clone(&peer), Ok(request)));
        async move {
            let response = answer.await;
            drop(in_flight);
            Ok::<_, Infallible>(response)
        }
    });
    let connection = h2.serve_connection(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    let mut closing = false;
    loop {
        let wait = HANDSHAKE_TIMEOUT.saturating_sub(activity.idle_for());
        tokio::select! {
            ended = connection.as_mut() => return ended.map_err(|e| e.to_string()),
            changed = stop.changed(), if !closing => {
                if changed.is_err() || *stop.borrow() {
                    closing = true;
                    connection.as_mut().graceful_shutdown();
                }
            }
            () = tokio::time::sleep(wait), if !closing => {
                if activity.idle_for() >= HANDSHAKE_TIMEOUT {
                    closing = true;
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// What one request was, for the counters.
struct Outcome {
    label: String,
    bytes_in: u64,
}

async fn handle<B>(
    shared: Arc<Shared>,
    peer: Arc<Peer>,
    request: Result<Request<B>, h1::RequestError>,
) -> Response<Body>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let started = Instant::now();
    let mut outcome = Outcome {
        label: UNMAPPED.to_owned(),
        bytes_in: 0,
    };
    // Kept (cheap clones) to name the request in the log, should it be refused.
    let (line, result) = match request {
        Ok(request) => {
            let line = Some((request.method().clone(), request.uri().clone()));
            let result = match tokio::time::timeout(
                REQUEST_TIMEOUT,
                route(&shared, &peer, request, &mut outcome),
            )
            .await
            {
                Ok(result) => result,
                Err(_) => Err(RelayError::Downstream(request_timeout())),
            };
            (line, result)
        }
        Err(unreadable) => (
            None,
            Err(RelayError::Downstream(unreadable_request(&unreadable))),
        ),
    };
    let counters = shared.stats.endpoint(&outcome.label);
    let response = match result {
        Ok(response) => response,
        Err(e) => {
            shared.stats.record_error(e.origin());
            let denial = e.denial();
            let line = format!(
                "{} from {} (certificate {}): {e}",
                line.map_or_else(
                    || "(unreadable request)".to_owned(),
                    |(method, uri)| format!("{method} {}", uri.path())
                ),
                peer.remote,
                peer.thumbprint().unwrap_or("none"),
            );
            if denial.status.is_server_error() {
                shared.handler_log.error(&line);
            } else {
                shared.handler_log.warn(&line);
            }
            e.into_response()
        }
    };
    shared.stats.record(
        &counters,
        response.status().as_u16(),
        outcome.bytes_in,
        started.elapsed(),
    );
    let (parts, body) = response.into_parts();
    let counting = body
        .map_frame(move |frame: Frame<Bytes>| {
            if let Some(data) = frame.data_ref() {
                counters.add_bytes_out(data.len() as u64);
            }
            frame
        })
        .boxed();
    Response::from_parts(parts, counting)
}

fn request_timeout() -> Denial {
    Denial::new(
        StatusCode::REQUEST_TIMEOUT,
        "CMGService_Request_Timeout",
        format!(
            "the request took longer than {} s to arrive or to be answered",
            REQUEST_TIMEOUT.as_secs()
        ),
        "retry later",
    )
}

/// The answer to an HTTP/1.1 request the gateway could not read (the connection then closes).
fn unreadable_request(e: &h1::RequestError) -> Denial {
    use h1::RequestError as E;
    match e {
        E::Malformed(why) => Denial::new(
            e.status(),
            "CMGService_Bad_Request",
            format!("the request is not valid HTTP/1.1: {why}"),
            "send a well-formed request",
        ),
        E::HeadTooLarge => Denial::new(
            e.status(),
            "CMGService_Request_Header_Too_Large",
            format!(
                "the request line and headers exceed {MAX_HEAD_BYTES} bytes or {MAX_HEADERS} fields"
            ),
            "send fewer or smaller headers",
        ),
        E::BodyTooLarge => too_large(),
        E::BodyTimeout => request_timeout(),
        E::UnsupportedTransferCoding => Denial::new(
            e.status(),
            "CMGService_Transfer_Coding_Not_Supported",
            "only the chunked transfer coding is accepted",
            "send the body with Content-Length or chunked",
        ),
        E::ExpectationFailed => Denial::new(
            e.status(),
            "CMGService_Expectation_Failed",
            "only 'Expect: 100-continue' is understood",
            "remove the Expect header",
        ),
    }
}

async fn route<B>(
    shared: &Shared,
    peer: &Peer,
    request: Request<B>,
    outcome: &mut Outcome,
) -> Result<Response<Body>, RelayError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let path = request.uri().path();
    if policy::parse_route(path) == Some(Route::Metadata) {
        outcome.label = METADATA.to_owned();
        return metadata(shared, request.method());
    }
    let Some(active) = shared.active() else {
        return Err(crate::tunnel::unavailable(
            "this gateway has not yet received its settings from a connection point",
        ));
    };
    let endpoint = match policy::check_route(&active, path).map_err(RelayError::Downstream)? {
        Route::Metadata => return metadata(shared, request.method()),
        Route::Relay { endpoint, .. } => endpoint.to_owned(),
    };
    outcome.label.clone_from(&endpoint);
    let identity = match pki_verdict(shared, peer, &active).await {
        Some(Verdict::Trusted { subject }) => Identity::Pki { subject },
        Some(refused @ (Verdict::Revoked { .. } | Verdict::Unknown { .. })) => {
            return Err(RelayError::Downstream(refused.denial().unwrap_or_else(
                || {
                    Denial::new(
                        StatusCode::FORBIDDEN,
                        "CMGService_Certificate_Revoked",
                        "the client certificate is refused",
                        "enroll the device for a new certificate",
                    )
                },
            )));
        }
        Some(Verdict::NotTrusted { .. }) | None => policy::authorize(
            &active,
            &endpoint,
            peer.thumbprint(),
            request.headers().get(header::AUTHORIZATION),
            unix_now(),
            &peer.verified,
        )
        .map_err(RelayError::Downstream)?,
    };
    let forwarded = forward_request(
        shared,
        request,
        &identity,
        peer.thumbprint
            .clone()
            .unwrap_or_else(|| HeaderValue::from_static("")),
        outcome,
    )
    .await?;
    let (tunnel, response) = shared.tunnels.send(forwarded).await?;
    tracing::debug!(tunnel, who = %identity.describe(), %endpoint, "relayed");
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, body.boxed()))
}

/// The PKI verdict on the connection's certificate (DESIGN §4), decided once per connection,
/// settings version and CRL generation. `None` when no certificate was sent or no CA is trusted.
async fn pki_verdict(shared: &Shared, peer: &Peer, active: &policy::Active) -> Option<Verdict> {
    let store = active.trust.as_ref()?;
    if peer.chain.is_empty() {
        return None;
    }
    let version = active.settings.version;
    let cached = peer
        .pki
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .filter(|c| c.version == version && c.generation == shared.crls.generation())
        .map(|c| c.verdict.clone());
    if let Some(verdict) = cached {
        return Some(verdict);
    }
    let now = UnixTime::now();
    let (verdict, generation) = match pki::chain_check(store, &peer.chain, now) {
        Err(reason) => (Verdict::NotTrusted { reason }, shared.crls.generation()),
        Ok(subject) if !active.settings.crl_check => {
            (Verdict::Trusted { subject }, shared.crls.generation())
        }
        Ok(_) => {
            // The distribution points of a certificate a trusted CA signed (and of the
            // intermediates the device sent): fetched now if never seen.
            let urls: Vec<String> = peer
                .chain
                .iter()
                .filter_map(|c| cmg_pki::crl::crl_distribution_points(c).ok())
                .flatten()
                .collect();
            crl::learn(shared, &urls).await;
            let set = shared.crls.snapshot();
            let crls = set.usable(unix_now());
            (
                pki::decide(store, &peer.chain, Some(&crls), now),
                set.generation,
            )
        }
    };
    match &verdict {
        Verdict::Trusted { subject } => tracing::debug!(
            remote = %peer.remote,
            crl_check = active.settings.crl_check,
            "connection authenticated by PKI certificate {subject}"
        ),
        Verdict::NotTrusted { reason } => tracing::debug!(
            remote = %peer.remote,
            "client certificate does not chain to a trusted CA ({reason}); token rules apply"
        ),
        Verdict::Revoked { .. } | Verdict::Unknown { .. } => {}
    }
    *peer.pki.lock().unwrap_or_else(|p| p.into_inner()) = Some(CachedPki {
        version,
        generation,
        verdict: verdict.clone(),
    });
    Some(verdict)
}

fn metadata(shared: &Shared, method: &Method) -> Result<Response<Body>, RelayError> {
    if method != Method::GET && method != Method::HEAD {
        return Err(RelayError::Downstream(Denial::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "CMGService_Method_Not_Allowed",
            "ServiceMetadata answers GET only",
            "use GET",
        )));
    }
    let body = serde_json::json!({
        "cmg": shared.config.name,
        "fqdn": shared.config.fqdn,
        "instance": shared.config.instance,
    });
    Ok(json_response(StatusCode::OK, &body, None))
}

fn too_large() -> Denial {
    Denial::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "CMGService_Request_Too_Large",
        format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
        "send smaller batches",
    )
}

/// The request as it goes through the tunnel: same method, path, query and body; the device's
/// `x-cmg-*` and hop-by-hop headers dropped; the identity the gateway verified added.
async fn forward_request<B>(
    shared: &Shared,
    request: Request<B>,
    identity: &Identity,
    thumbprint: HeaderValue,
    outcome: &mut Outcome,
) -> Result<Request<Bytes>, RelayError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (parts, body) = request.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(RelayError::Downstream(too_large()));
    }
    let body = Limited::new(body, MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                RelayError::Downstream(too_large())
            } else {
                RelayError::Downstream(Denial::new(
                    StatusCode::BAD_REQUEST,
                    "CMGService_Bad_Request",
                    format!("the request body could not be read: {e}"),
                    "send the request again",
                ))
            }
        })?
        .to_bytes();
    outcome.bytes_in = body.len() as u64;
    // The CMG's own name and the device's path and query, without parsing a URL again.
    let mut uri = hyper::http::uri::Parts::default();
    uri.scheme = Some(hyper::http::uri::Scheme::HTTPS);
    uri.authority = Some(shared.authority.clone());
    uri.path_and_query = Some(
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/")),
    );
    let uri = hyper::Uri::from_parts(uri).map_err(RelayError::internal)?;
    let (mut headers, credential) = tunnel_headers(
        parts.headers,
        identity,
        thumbprint,
        shared.gateway_header.clone(),
    )?;
    let body = with_credential(credential, body, &mut headers);
    let mut forwarded = Request::builder()
        .method(parts.method)
        .uri(uri)
        .body(body)
        .map_err(RelayError::internal)?;
    *forwarded.headers_mut() = headers;
    Ok(forwarded)
}

/// A device's request headers as they go through the tunnel: hop-by-hop headers and anything
/// `x-cmg-*` the device sent dropped, the identity the gateway verified added, and the
/// `Authorization` value taken out, to travel in the request's data ([`with_credential`]).
fn tunnel_headers(
    mut headers: HeaderMap,
    identity: &Identity,
    thumbprint: HeaderValue,
    gateway: HeaderValue,
) -> Result<(HeaderMap, Option<HeaderValue>), RelayError> {
    strip_hop_by_hop(&mut headers);
    let relayed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with("x-cmg-"))
        .cloned()
        .collect();
    for name in relayed {
        headers.remove(name);
    }
    headers.remove(header::HOST);
    headers.remove(header::CONTENT_LENGTH);
    let credential = headers.remove(header::AUTHORIZATION);
    headers.insert(relay::IDENTITY, HeaderValue::from_static(identity.kind()));
    if let Identity::Pki { subject } = identity {
        headers.insert(
            relay::PKI_SUBJECT,
            HeaderValue::from_bytes(subject.as_bytes()).map_err(RelayError::internal)?,
        );
    }
    headers.insert(relay::CLIENT_THUMBPRINT, thumbprint);
    headers.insert(relay::GATEWAY, gateway);
    Ok((headers, credential))
}

/// The request's data on the tunnel: the device's `Authorization` value, if it sent one, then
/// its body; [`CREDENTIAL_LENGTH`] tells the connection point where one ends (why not
/// a header: see there). One buffer, so the body is copied once: it is at most
/// [`MAX_BODY_BYTES`], and most requests (policy, location) have none.
fn with_credential(credential: Option<HeaderValue>, body: Bytes, headers: &mut HeaderMap) -> Bytes {
    let Some(credential) = credential else {
        return body;
    };
    let credential = credential.as_bytes();
    let mut data = Vec::with_capacity(credential.len() + body.len());
    data.extend_from_slice(credential);
    data.extend_from_slice(&body);
    headers.insert(CREDENTIAL_LENGTH, HeaderValue::from(credential.len()));
    Bytes::from(data)
}

/// The headers that belong to one connection (RFC 9110 §7.6.1), besides any that `Connection`
/// names.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// Removes the headers that belong to one connection, including any named in `Connection`.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names they have is cheaper than a removal
    // (a hash and a probe) for every name that might be there.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(&HOP_BY_HOP) {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn through_the_tunnel_the_token_is_in_the_data_and_only_the_gateway_names_the_identity() {
        let mut device = HeaderMap::new();
        device.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        device.insert(
            relay::IDENTITY,
            HeaderValue::from_static("BulkRegistration"),
        );
        device.insert("x-cmg-anything", HeaderValue::from_static("forged"));
        // A device cannot move the credential's end into its body.
        device.insert(CREDENTIAL_LENGTH, HeaderValue::from_static("3"));
        device.insert(header::HOST, HeaderValue::from_static("cmg.contoso.com"));
        let identity = Identity::Pki {
            subject: "CN=pki-device-1".into(),
        };
        let (mut out, credential) = tunnel_headers(
            device,
            &identity,
            HeaderValue::from_static("thumb"),
            HeaderValue::from_static("GraniteFalls/1"),
        )
        .unwrap();
        assert!(
            out.get(header::AUTHORIZATION).is_none(),
            "HPACK must not code the token"
        );
        let data = with_credential(credential, Bytes::from_static(b"{\"body\":1}"), &mut out);
        assert_eq!(&data[..], b"Bearer x{\"body\":1}");
        assert_eq!(out.get(CREDENTIAL_LENGTH).unwrap(), "8");
        assert_eq!(out.get_all(CREDENTIAL_LENGTH).iter().count(), 1);
        assert_eq!(out.get(relay::IDENTITY).unwrap(), "PKI");
        assert_eq!(out.get(relay::PKI_SUBJECT).unwrap(), "CN=pki-device-1");
        assert_eq!(out.get(relay::CLIENT_THUMBPRINT).unwrap(), "thumb");
        assert_eq!(out.get(relay::GATEWAY).unwrap(), "GraniteFalls/1");
        assert!(out.get("x-cmg-anything").is_none());
        assert!(out.get(header::HOST).is_none());
    }

    #[test]
    fn without_a_credential_the_data_is_the_body_and_a_forged_length_is_dropped() {
        let mut device = HeaderMap::new();
        device.insert(CREDENTIAL_LENGTH, HeaderValue::from_static("3"));
        let (mut headers, credential) = tunnel_headers(
            device,
            &Identity::Pki {
                subject: "CN=pki-device-1".into(),
            },
            HeaderValue::from_static("thumb"),
            HeaderValue::from_static("GraniteFalls/1"),
        )
        .unwrap();
        assert!(credential.is_none());
        let body = Bytes::from_static(b"inventory");
        assert_eq!(
            with_credential(credential, body.clone(), &mut headers),
            body
        );
        assert!(headers.get(CREDENTIAL_LENGTH).is_none());
    }

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::AUTHORIZATION));

        // Each on its own is found, whatever else the message has.
        for name in &HOP_BY_HOP {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
            h.insert(name.clone(), HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut h);
            assert_eq!(h.keys().collect::<Vec<_>>(), [header::ACCEPT], "{name}");
        }
    }
}
