//! Accepting device connections: TLS, the device certificate (once per connection), HTTP/1.1 and
//! HTTP/2 with time-outs, and graceful shutdown.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tower_service::Service;

use super::tokens::VerifiedClient;
use super::{HANDSHAKE_TIMEOUT, IDLE_TIMEOUT};

/// What the TLS handshake established about the other end, shared by every request on the
/// connection.
#[derive(Debug)]
pub(crate) struct Peer {
    pub remote: SocketAddr,
    /// base64url SHA-256 of the client certificate, if one was presented. The handshake proved
    /// the peer holds its key.
    pub thumbprint: Option<String>,
    /// The client token verified on this connection, reused while the same token is presented
    /// and the site's blocked lists have not changed: one verification per connection.
    pub verified: Mutex<Option<VerifiedClient>>,
}

pub(crate) async fn serve(
    listener: TcpListener,
    tls: TlsAcceptor,
    router: Router,
    mut stop: watch::Receiver<bool>,
    request_timeout: std::time::Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut http = auto::Builder::new(TokioExecutor::new());
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        .keep_alive(true);
    http.http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(IDLE_TIMEOUT / 2));
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!("cannot accept a connection: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let _ = tcp.set_nodelay(true);
        let tls = tls.clone();
        let router = router.clone();
        let http = http.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return tracing::debug!(%remote, "TLS handshake failed: {e}"),
                Err(_) => return tracing::debug!(%remote, "TLS handshake timed out"),
            };
            let thumbprint = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|cert| cmg_pki::thumbprint_sha256(cert));
            let peer = Arc::new(Peer {
                remote,
                thumbprint,
                verified: Mutex::new(None),
            });
            let service =
                hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
                    request.extensions_mut().insert(Arc::clone(&peer));
                    let mut router = router.clone();
                    async move { router.call(request).await }
                });
            let connection = http.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(connection.into_owned()).await {
                tracing::debug!(%remote, "connection ended: {e}");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(request_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some connections were still busy at shutdown and were closed");
    }
}
