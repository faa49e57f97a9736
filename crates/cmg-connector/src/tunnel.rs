//! Keeping one tunnel up: dial, TLS, serve HTTP/2 on it, and dial again with backoff and jitter
//! when it drops. HTTP/2 pings find a dead tunnel within a minute (DESIGN §6).
//!
//! Stopping closes a tunnel gracefully: a GOAWAY tells the gateway to send no more requests on
//! it (it sends them to another tunnel), the requests already on it are answered, and then the
//! TLS session is closed with `close_notify`. So stopping one of several connection points
//! loses no request, where killing one loses those in flight. A gateway that stops closes its
//! tunnels the same way, and that is logged as news, not as a fault; a tunnel whose gateway
//! side ends without `close_notify` (the process died, the network dropped it) is a fault.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use cmg_log::ComponentLog;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio_rustls::TlsConnector;

use crate::relay::Relay;
use crate::{DRAIN_TIMEOUT, TunnelTarget, stopping};

/// Ping the gateway this often; a tunnel that does not answer within [`PING_TIMEOUT`] is closed.
const PING_INTERVAL: Duration = Duration::from_secs(60);
const PING_TIMEOUT: Duration = Duration::from_secs(20);
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_millis(500);

/// How a tunnel that came up ended.
enum Ended {
    /// Closed on stop, after the answers in flight (or the drain time-out).
    Stopped,
    /// Closed by the gateway (GOAWAY, then TLS close_notify): it is stopping or restarting.
    /// Dial again.
    Closed,
    /// Lost; dial again.
    Lost(String),
}

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
        match serve_once(&target, &tls, &relay, &live, &log, stop.clone()).await {
            Ended::Stopped => return,
            Ended::Closed => log.info(&format!(
                "Gateway {} ({}) closed the tunnel: it is stopping or restarting; dialling it again",
                target.addr, target.server_name
            )),
            Ended::Lost(why) => log.warn(&format!(
                "Tunnel to gateway {} ({}) is down: {why}",
                target.addr, target.server_name
            )),
        }
        // A tunnel that lived a while starts over with short waits.
        if started.elapsed() > PING_INTERVAL {
            backoff = FIRST_BACKOFF;
        }
        let wait = jitter(backoff);
        backoff = (backoff * 2).min(max_backoff);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stopping(&mut stop) => return,
        }
    }
}

async fn serve_once(
    target: &TunnelTarget,
    tls: &TlsConnector,
    relay: &Arc<Relay>,
    live: &AtomicUsize,
    log: &ComponentLog,
    mut stop: watch::Receiver<bool>,
) -> Ended {
    let stream = tokio::select! {
        dialled = dial(target, tls) => match dialled {
            Ok(stream) => stream,
            Err(why) => return Ended::Lost(why),
        },
        _ = stopping(&mut stop) => return Ended::Stopped,
    };
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
    let (stream, closed_by_gateway) = NotesEnd::new(stream);
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(PING_INTERVAL))
        .keep_alive_timeout(PING_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    // `drive`: the answers relay tasks finish together leave in one write.
    let ended = tokio::select! {
        result = cmg_tunnel::drive(connection.as_mut()) => match result {
            Ok(()) if closed_by_gateway.load(Ordering::Relaxed) => Ended::Closed,
            Ok(()) => Ended::Lost(
                "the gateway's end closed without TLS close_notify (its process ended, or the \
                 network dropped the connection)"
                    .into(),
            ),
            Err(e) => Ended::Lost(format!("the tunnel closed: {}", cmg_log::error_chain(&e))),
        },
        _ = stopping(&mut stop) => {
            log.info(&format!(
                "Closing the tunnel to gateway {} ({}): the connection point is stopping; \
                 the gateway sends new requests elsewhere, the ones in flight are answered first",
                target.addr, target.server_name
            ));
            connection.as_mut().graceful_shutdown();
            match tokio::time::timeout(DRAIN_TIMEOUT, connection.as_mut()).await {
                Ok(Ok(())) => log.info(&format!(
                    "Closed the tunnel to gateway {} ({})",
                    target.addr, target.server_name
                )),
                Ok(Err(e)) if hung_up(&e) => log.info(&format!(
                    "Closed the tunnel to gateway {} ({}); the gateway hung up first",
                    target.addr, target.server_name
                )),
                Ok(Err(e)) => log.warn(&format!(
                    "The tunnel to gateway {} ({}) failed while closing: {}",
                    target.addr,
                    target.server_name,
                    cmg_log::error_chain(&e)
                )),
                Err(_) => log.warn(&format!(
                    "Closed the tunnel to gateway {} ({}) with requests still in flight after {} s",
                    target.addr,
                    target.server_name,
                    DRAIN_TIMEOUT.as_secs()
                )),
            }
            Ended::Stopped
        }
    };
    live.fetch_sub(1, Ordering::Relaxed);
    ended
}

async fn dial(
    target: &TunnelTarget,
    tls: &TlsConnector,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let tcp = tokio::time::timeout(DIAL_TIMEOUT, tokio::net::TcpStream::connect(target.addr))
        .await
        .map_err(|_| "timed out connecting".to_owned())?
        .map_err(|e| format!("cannot connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(target.server_name.clone())
        .map_err(|e| format!("bad server name: {e}"))?;
    tokio::time::timeout(DIAL_TIMEOUT, tls.connect(name, tcp))
        .await
        .map_err(|_| "timed out in the TLS handshake".to_owned())?
        .map_err(|e| format!("TLS handshake failed: {e}"))
}

/// Whether a closing tunnel ended because the gateway hung up first, which it does as soon as
/// the GOAWAY finds nothing in flight, before the connection point's last frames reach it.
fn hung_up(error: &hyper::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset, UnexpectedEof};
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        let io = e
            .downcast_ref::<h2::Error>()
            .and_then(h2::Error::get_io)
            .or_else(|| e.downcast_ref::<std::io::Error>());
        if let Some(io) = io {
            return matches!(io.kind(), BrokenPipe | ConnectionReset | UnexpectedEof);
        }
        cause = e.source();
    }
    false
}

/// A tunnel's TLS stream that notes whether the gateway ended it cleanly. hyper's HTTP/2 server
/// reports a clean end for a TLS `close_notify` and for a bare TCP close alike; only the first
/// is a gateway closing the tunnel on purpose. Below this, a TLS stream reads end of stream
/// after `close_notify` and an `UnexpectedEof` error without it.
struct NotesEnd<S> {
    stream: S,
    ended_cleanly: Arc<AtomicBool>,
}

impl<S> NotesEnd<S> {
    fn new(stream: S) -> (Self, Arc<AtomicBool>) {
        let ended_cleanly = Arc::new(AtomicBool::new(false));
        let notes = NotesEnd {
            stream,
            ended_cleanly: Arc::clone(&ended_cleanly),
        };
        (notes, ended_cleanly)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for NotesEnd<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let (room, filled) = (buf.remaining(), buf.filled().len());
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if room > 0 && matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() == filled {
            self.ended_cleanly.store(true, Ordering::Relaxed);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for NotesEnd<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// ±25 % so that many connection points do not redial in step.
fn jitter(base: Duration) -> Duration {
    let random = (uuid::Uuid::new_v4().as_u128() % 1000) as f64 / 1000.0;
    base.mul_f64(0.75 + random * 0.5)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn an_end_of_stream_from_below_is_a_clean_end_and_an_error_is_not() {
        let (near, mut far) = tokio::io::duplex(64);
        let (mut stream, ended_cleanly) = NotesEnd::new(near);
        far.write_all(b"frame").await.unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(stream.read(&mut buf).await.unwrap(), 5);
        assert!(!ended_cleanly.load(Ordering::Relaxed), "data is no end");
        drop(far);
        assert_eq!(stream.read(&mut buf).await.unwrap(), 0);
        assert!(ended_cleanly.load(Ordering::Relaxed));

        // What a TLS stream reads when the peer's TCP closes without close_notify.
        let (mut stream, ended_cleanly) = NotesEnd::new(Truncated);
        let error = stream.read(&mut buf).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
        assert!(!ended_cleanly.load(Ordering::Relaxed));
    }

    /// A stream whose every read fails as a truncated TLS stream's does.
    struct Truncated;

    impl AsyncRead for Truncated {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()))
        }
    }
}
