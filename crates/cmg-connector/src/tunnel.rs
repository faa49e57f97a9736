//! Keeping one tunnel up: dial, TLS, serve HTTP/2 on it, and dial again with backoff and jitter
//! when it drops. HTTP/2 pings find a dead tunnel within a minute (DESIGN §6).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cmg_log::ComponentLog;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;

use crate::TunnelTarget;
use crate::relay::Relay;

/// Ping the gateway this often; a tunnel that does not answer within [`PING_TIMEOUT`] is closed.
const PING_INTERVAL: Duration = Duration::from_secs(60);
const PING_TIMEOUT: Duration = Duration::from_secs(20);
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_millis(500);

pub(crate) async fn keep(
    target: TunnelTarget,
    tls: TlsConnector,
    relay: Arc<Relay>,
    mut stop: watch::Receiver<bool>,
    live: Arc<AtomicUsize>,
    log: ComponentLog,
    max_backoff: Duration,
) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let started = tokio::time::Instant::now();
        let outcome = tokio::select! {
            outcome = serve_once(&target, &tls, &relay, &live, &log) => outcome,
            _ = stop.changed() => return,
        };
        if let Err(e) = outcome {
            log.warn(&format!(
                "Tunnel to gateway {} ({}) is down: {e}",
                target.addr, target.server_name
            ));
        }
        // A tunnel that lived a while starts over with short waits.
        if started.elapsed() > PING_INTERVAL {
            backoff = FIRST_BACKOFF;
        }
        let wait = jitter(backoff);
        backoff = (backoff * 2).min(max_backoff);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn serve_once(
    target: &TunnelTarget,
    tls: &TlsConnector,
    relay: &Arc<Relay>,
    live: &AtomicUsize,
    log: &ComponentLog,
) -> Result<(), String> {
    let tcp = tokio::time::timeout(DIAL_TIMEOUT, tokio::net::TcpStream::connect(target.addr))
        .await
        .map_err(|_| "timed out connecting".to_owned())?
        .map_err(|e| format!("cannot connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(target.server_name.clone())
        .map_err(|e| format!("bad server name: {e}"))?;
    let stream = tokio::time::timeout(DIAL_TIMEOUT, tls.connect(name, tcp))
        .await
        .map_err(|_| "timed out in the TLS handshake".to_owned())?
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    log.info(&format!(
        "Connected to gateway {} ({})",
        target.addr, target.server_name
    ));
    live.fetch_add(1, Ordering::Relaxed);
    let relay = Arc::clone(relay);
    let service = hyper::service::service_fn(move |request| {
        let relay = Arc::clone(&relay);
        // Boxed: the relay's future is about 6 KB (the MP call, in process or over TLS, is
        // inside it), and hyper moves a stream's future several times on its way into the
        // task it spawns; a pointer moves for free.
        Box::pin(async move { Ok::<_, std::convert::Infallible>(relay.handle(request).await) })
    });
    let result = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(PING_INTERVAL))
        .keep_alive_timeout(PING_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    live.fetch_sub(1, Ordering::Relaxed);
    result.map_err(|e| format!("the tunnel closed: {}", cmg_log::error_chain(&e)))?;
    Err("the gateway closed the tunnel".into())
}

/// ±25 % so that many connection points do not redial in step.
fn jitter(base: Duration) -> Duration {
    let random = (uuid::Uuid::new_v4().as_u128() % 1000) as f64 / 1000.0;
    base.mul_f64(0.75 + random * 0.5)
}
