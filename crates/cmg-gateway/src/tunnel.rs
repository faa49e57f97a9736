//! The gateway's side of the tunnels (DESIGN §6): connection points dial in over TLS with a
//! certificate from the site root; on each connection the gateway is the HTTP/2 *client*. It
//! keeps a settings long poll going on every tunnel and round-robins device requests over the
//! tunnels that are up.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use cmg_log::error_chain;
use cmg_proto::tunnel::{GatewaySettings, LONG_POLL_SECS, SETTINGS};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http2::SendRequest;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::Shared;
use crate::error::{Denial, RelayError};
use crate::limits::AcceptFailures;

/// How long a connection point may take for its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 PING interval on an idle tunnel, and how long to wait for the answer before the
/// tunnel counts as dead.
const PING_INTERVAL: Duration = Duration::from_secs(20);
const PING_TIMEOUT: Duration = Duration::from_secs(20);
/// A settings answer larger than this is refused (CRLs included, it should be far smaller).
const MAX_SETTINGS_BYTES: usize = 32 * 1024 * 1024;
/// After a failed poll, wait this long before the next one on the same tunnel.
const POLL_RETRY: Duration = Duration::from_secs(5);
/// Seconds a device is told to wait when no tunnel is up.
pub(crate) const RETRY_AFTER_SECS: u32 = 30;

/// One connection point's tunnel.
#[derive(Debug)]
pub(crate) struct Tunnel {
    pub id: u64,
    pub remote: SocketAddr,
    /// Subject of the connection point's certificate.
    pub subject: String,
    sender: SendRequest<Full<Bytes>>,
}

impl Tunnel {
    fn is_up(&self) -> bool {
        !self.sender.is_closed()
    }
}

/// The live tunnels of this gateway instance.
#[derive(Debug, Default)]
pub(crate) struct Tunnels {
    /// Replaced whole when a tunnel comes or goes, so that a request takes it with one
    /// reference count, not a copy.
    list: RwLock<Arc<[Arc<Tunnel>]>>,
    next: AtomicUsize,
    ids: AtomicU64,
}

pub(crate) fn unavailable(message: &str) -> RelayError {
    RelayError::Upstream(
        Denial::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "CMGConnector_Unavailable",
            message,
            "retry later; the admin checks that a connection point is running and can reach \
             this gateway's tunnel port",
        )
        .with_retry_after(RETRY_AFTER_SECS),
    )
}

impl Tunnels {
    /// Tunnels whose HTTP/2 connection is up.
    pub fn live(&self) -> usize {
        self.list
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|t| t.is_up())
            .count()
    }

    fn add(&self, tunnel: Arc<Tunnel>) -> usize {
        let mut list = self.list.write().unwrap_or_else(|p| p.into_inner());
        *list = list.iter().cloned().chain([tunnel]).collect();
        list.len()
    }

    fn remove(&self, id: u64) -> usize {
        let mut list = self.list.write().unwrap_or_else(|p| p.into_inner());
        *list = list.iter().filter(|t| t.id != id).cloned().collect();
        list.len()
    }

    /// Sends a device request over the next healthy tunnel (round robin). A tunnel that closed
    /// before the request went out hands it back and the next tunnel is tried, so no request is
    /// lost silently.
    pub async fn send(
        &self,
        mut request: Request<Full<Bytes>>,
    ) -> Result<(u64, Response<Incoming>), RelayError> {
        let snapshot = Arc::clone(&self.list.read().unwrap_or_else(|p| p.into_inner()));
        let n = snapshot.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            let tunnel = &snapshot[(start + i) % n];
            if !tunnel.is_up() {
                continue;
            }
            let mut sender = tunnel.sender.clone();
            match sender.try_send_request(request).await {
                Ok(response) => return Ok((tunnel.id, response)),
                Err(mut e) => match e.take_message() {
                    Some(back) => {
                        tracing::debug!(
                            tunnel = tunnel.id,
                            remote = %tunnel.remote,
                            subject = %tunnel.subject,
                            "tunnel could not take a request, trying the next: {}",
                            e.error()
                        );
                        request = back;
                    }
                    None => {
                        return Err(RelayError::Upstream(Denial::new(
                            StatusCode::BAD_GATEWAY,
                            "CMGConnector_Error",
                            format!(
                                "the connection point behind tunnel {} failed while answering: {}",
                                tunnel.id,
                                e.error()
                            ),
                            "retry later; the admin finds the cause in SMS_Cloud_ProxyConnector.log",
                        )));
                    }
                },
            }
        }
        Err(unavailable(
            "no connection point is connected to this gateway instance",
        ))
    }
}

/// Accepts tunnels until `stop`, then closes them all.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: TlsAcceptor,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    let mut failures = AcceptFailures::new("tunnel connection");
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    if let Some(line) = failures.record(std::time::Instant::now(), &e) {
                        shared.handler_log.warn(&line);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let _ = tcp.set_nodelay(true);
        connections.spawn(connection(
            tcp,
            remote,
            tls.clone(),
            Arc::clone(&shared),
            stop.clone(),
        ));
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

async fn connection(
    tcp: tokio::net::TcpStream,
    remote: SocketAddr,
    tls: TlsAcceptor,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let log = &shared.handler_log;
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            return log.warn(&format!(
                "Refused a tunnel from {remote}: TLS handshake failed: {e} [rule tunnel_certificate]"
            ));
        }
        Err(_) => {
            return log.warn(&format!(
                "Refused a tunnel from {remote}: TLS handshake timed out"
            ));
        }
    };
    let subject = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|cert| cmg_pki::CertInfo::from_der(cert).ok())
        .map(|info| info.subject)
        .unwrap_or_else(|| "unknown".into());
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .keep_alive_interval(PING_INTERVAL)
        .keep_alive_timeout(PING_TIMEOUT)
        .keep_alive_while_idle(true);
    let (sender, conn) = match builder.handshake(TokioIo::new(stream)).await {
        Ok(pair) => pair,
        Err(e) => {
            return log.warn(&format!(
                "Tunnel from {remote} ({subject}) failed its HTTP/2 handshake: {}",
                error_chain(&e)
            ));
        }
    };
    let id = shared.tunnels.ids.fetch_add(1, Ordering::Relaxed) + 1;
    let tunnel = Arc::new(Tunnel {
        id,
        remote,
        subject: subject.clone(),
        sender: sender.clone(),
    });
    let count = shared.tunnels.add(Arc::clone(&tunnel));
    log.info(&format!(
        "Tunnel {id} connected from {remote} ({subject}); {count} tunnel(s) connected"
    ));
    let poll = tokio::spawn(poll_settings(Arc::clone(&shared), Arc::clone(&tunnel)));
    let reason = tokio::select! {
        ended = conn => match ended {
            Ok(()) => "the connection point closed it".to_owned(),
            Err(e) => error_chain(&e),
        },
        _ = stop.changed() => "the gateway is shutting down".to_owned(),
    };
    poll.abort();
    let count = shared.tunnels.remove(id);
    log.warn(&format!(
        "Tunnel {id} from {remote} ({subject}) disconnected: {reason}; {count} tunnel(s) connected"
    ));
}

/// Keeps a settings long poll going on one tunnel for as long as it is up.
async fn poll_settings(shared: Arc<Shared>, tunnel: Arc<Tunnel>) {
    let mut sender = tunnel.sender.clone();
    // The connection point answers within LONG_POLL_SECS; a poll that takes much longer is stuck.
    let limit = Duration::from_secs(LONG_POLL_SECS * 2 + 5);
    loop {
        if sender.is_closed() {
            return;
        }
        let uri = match shared.settings_version() {
            Some(v) => format!("https://{}{SETTINGS}?after={v}", shared.config.fqdn),
            None => format!("https://{}{SETTINGS}", shared.config.fqdn),
        };
        let request = match Request::get(uri)
            .header(cmg_proto::mp::relay::GATEWAY, shared.gateway_header.clone())
            .body(Full::new(Bytes::new()))
        {
            Ok(r) => r,
            Err(e) => {
                shared
                    .handler_log
                    .error(&format!("cannot build the settings request: {e}"));
                return;
            }
        };
        let outcome = tokio::time::timeout(limit, async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| error_chain(&e))?;
            let status = response.status();
            if status == StatusCode::NO_CONTENT {
                return Ok(None);
            }
            if status != StatusCode::OK {
                return Err(format!("the connection point answered {status}"));
            }
            let body = Limited::new(response.into_body(), MAX_SETTINGS_BYTES)
                .collect()
                .await
                .map_err(|e| format!("reading the settings failed: {}", error_chain(&*e)))?
                .to_bytes();
            serde_json::from_slice::<GatewaySettings>(&body)
                .map(Some)
                .map_err(|e| format!("the settings are not valid JSON GatewaySettings: {e}"))
        })
        .await;
        match outcome {
            Ok(Ok(Some(settings))) => shared.apply_settings(settings, tunnel.id),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                if sender.is_closed() {
                    return;
                }
                shared.handler_log.warn(&format!(
                    "Settings poll on tunnel {} failed: {e}; retrying in {} s",
                    tunnel.id,
                    POLL_RETRY.as_secs()
                ));
                tokio::time::sleep(POLL_RETRY).await;
            }
            Err(_) => {
                shared.handler_log.warn(&format!(
                    "Settings poll on tunnel {} got no answer in {} s; polling again",
                    tunnel.id,
                    limit.as_secs()
                ));
            }
        }
    }
}
