//! The gateway's side of the tunnels (DESIGN §6): connection points dial in over TLS with a
//! certificate from the site root; on each connection the gateway is the HTTP/2 *client*. It
//! keeps a settings long poll going on every tunnel and sends each device request to the tunnel
//! that is up with the fewest requests waiting, round robin among equals.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use cmg_log::error_chain;
use cmg_proto::tunnel::{GatewaySettings, LONG_POLL_SECS, SETTINGS};
use h2::client::SendRequest;
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Bytes, Frame};
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::Shared;
use crate::error::{Denial, RelayError};
use crate::limits::AcceptFailures;

/// How long a connection point may take for its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stopping gateway waits for a tunnel's GOAWAY and close_notify to go out.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 PING interval on an idle tunnel, and how long to wait for the answer before the
/// tunnel counts as dead.
const PING_INTERVAL: Duration = Duration::from_secs(20);
const PING_TIMEOUT: Duration = Duration::from_secs(20);
/// A settings answer larger than this is refused (CRLs included, it should be far smaller).
const MAX_SETTINGS_BYTES: usize = 32 * 1024 * 1024;
/// HTTP/2 receive windows on a tunnel, per stream and for the whole connection: answers for
/// many devices share one connection, so its window is several streams' worth.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
/// The largest response head a connection point may send.
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// After a failed poll, wait this long before the next one on the same tunnel.
const POLL_RETRY: Duration = Duration::from_secs(5);
/// Seconds a device is told to wait when no tunnel is up.
pub(crate) const RETRY_AFTER_SECS: u32 = 30;

/// One connection point's tunnel.
///
/// The gateway speaks HTTP/2 on it with `h2` directly rather than through hyper's client, which
/// spawns a task per request to wait for the answer: here the device's own task waits for it,
/// so an answer wakes one task instead of two (DESIGN §6, and the gateway bench).
#[derive(Debug)]
pub(crate) struct Tunnel {
    pub id: u64,
    pub remote: SocketAddr,
    /// Subject of the connection point's certificate.
    pub subject: String,
    sender: SendRequest<Bytes>,
    /// Cleared when the tunnel's connection ends.
    up: AtomicBool,
    /// Device requests sent on this tunnel that have no answer yet (the settings long poll is
    /// not counted).
    waiting: AtomicUsize,
}

/// Why a request did not get an answer through a tunnel.
enum Attempt {
    /// The connection point did not take the request: the tunnel was closing or closed before
    /// the request went out, or its GOAWAY or `REFUSED_STREAM` says the request was not
    /// processed (RFC 9113 §6.8, §8.7). Another tunnel may take it.
    Refused(h2::Error),
    /// The request went out (or may have): it must not be sent again.
    Failed(h2::Error),
}

impl Tunnel {
    fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Sends a copy of `request`, so that a tunnel that refuses it leaves it for the next. The
    /// copy shares the body and the header values; only the header table is new.
    async fn send(&self, request: &Request<Bytes>) -> Result<Response<TunnelBody>, Attempt> {
        let mut sender = self
            .sender
            .clone()
            .ready()
            .await
            .map_err(|e| self.closing(e))?;
        let mut head = Request::new(());
        *head.method_mut() = request.method().clone();
        *head.uri_mut() = request.uri().clone();
        *head.headers_mut() = request.headers().clone();
        let end_of_stream = request.body().is_empty();
        let (answer, mut stream) = sender.send_request(head, end_of_stream).map_err(|e| {
            if e.is_go_away() || e.is_io() {
                // The connection ended or got a GOAWAY since `ready`: nothing went out.
                self.closing(e)
            } else {
                Attempt::Failed(e)
            }
        })?;
        if !end_of_stream {
            // Queued whole: a body is at most `MAX_BODY_BYTES` and already in memory, and h2
            // sends it as the connection point's window allows.
            for (frame, last) in data_frames(request.body()) {
                stream.send_data(frame, last).map_err(Attempt::Failed)?;
            }
        }
        let response = answer.await.map_err(|e| {
            if e.is_remote() && (e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM)) {
                Attempt::Refused(e)
            } else {
                Attempt::Failed(e)
            }
        })?;
        Ok(response.map(TunnelBody))
    }

    /// The tunnel takes no new requests (its connection point said GOAWAY, or the connection
    /// ended): it is no longer chosen, and the request goes to the next.
    fn closing(&self, e: h2::Error) -> Attempt {
        self.up.store(false, Ordering::Relaxed);
        Attempt::Refused(e)
    }
}

/// h2 copies a DATA frame shorter than this into the connection's write buffer; a longer one
/// it writes from its own buffer, and flushes the connection before it takes the next frame.
const COPIED_DATA_FRAME: usize = 255;
/// Data up to this size goes in frames h2 copies (see [`data_frames`]).
const SMALL_DATA: usize = 4 * 1024;

/// The frames a request's data goes out in. Most requests carry only the device's credential
/// (nearly 900 bytes): in one frame, each would end a write of the tunnel, where in frames
/// that h2 copies, the requests many devices hand over together leave in one write (the
/// tunnel's `drive`). Larger data goes as one frame, not copied.
fn data_frames(data: &Bytes) -> impl Iterator<Item = (Bytes, bool)> + '_ {
    let frame = if data.len() <= SMALL_DATA {
        COPIED_DATA_FRAME
    } else {
        data.len()
    };
    let count = data.len().div_ceil(frame);
    (0..count).map(move |i| {
        let end = ((i + 1) * frame).min(data.len());
        (data.slice(i * frame..end), i + 1 == count)
    })
}

/// A request counted in its tunnel's [`Tunnel::waiting`] from `begin` until dropped.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn begin(waiting: &'a AtomicUsize) -> Waiting<'a> {
        waiting.fetch_add(1, Ordering::Relaxed);
        Waiting(waiting)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An answer's body as it arrives through a tunnel. Each piece the device takes gives its
/// share of the flow-control window back to the connection point.
#[derive(Debug)]
pub(crate) struct TunnelBody(h2::RecvStream);

impl Body for TunnelBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let stream = &mut self.0;
        match ready!(stream.poll_data(cx)) {
            Some(Ok(data)) => {
                // Fails only when the stream is already gone, which the next poll reports.
                let _ = stream.flow_control().release_capacity(data.len());
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e))),
            None => match ready!(stream.poll_trailers(cx)) {
                Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
                Ok(None) => Poll::Ready(None),
                Err(e) => Poll::Ready(Some(Err(e))),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
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

    /// Sends a device request over the live tunnel with the fewest requests waiting for an
    /// answer, round robin among equals (DESIGN §6 asks for round robin; with every tunnel
    /// keeping up the two are the same). A tunnel whose connection point stalls — its host
    /// busy with something else for a few milliseconds — collects waiting requests, and new
    /// ones go to the others instead of queueing behind it. A tunnel that closed before the
    /// request went out, or that the connection point says it did not process (a connection
    /// point that stops drains its tunnels), leaves it for the next tunnel, so no request is
    /// lost silently.
    pub async fn send(
        &self,
        request: Request<Bytes>,
    ) -> Result<(u64, Response<TunnelBody>), RelayError> {
        let snapshot = Arc::clone(&self.list.read().unwrap_or_else(|p| p.into_inner()));
        let n = snapshot.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let round = (0..n).map(|i| (start + i) % n);
        // `min_by_key` keeps the first of equals: round robin among them.
        let least_waiting = round
            .clone()
            .filter(|&i| snapshot[i].is_up())
            .min_by_key(|&i| snapshot[i].waiting.load(Ordering::Relaxed));
        let order = least_waiting
            .into_iter()
            .chain(round.filter(|&i| Some(i) != least_waiting));
        for i in order {
            let tunnel = &snapshot[i];
            if !tunnel.is_up() {
                continue;
            }
            // Counted down however this ends, the device's going away included.
            let answered = Waiting::begin(&tunnel.waiting);
            let sent = tunnel.send(&request).await;
            drop(answered);
            match sent {
                Ok(response) => return Ok((tunnel.id, response)),
                Err(Attempt::Refused(e)) => {
                    tracing::debug!(
                        tunnel = tunnel.id,
                        remote = %tunnel.remote,
                        subject = %tunnel.subject,
                        "tunnel did not take a request, trying the next: {}",
                        error_chain(&e)
                    );
                }
                Err(Attempt::Failed(e)) => {
                    return Err(RelayError::Upstream(Denial::new(
                        StatusCode::BAD_GATEWAY,
                        "CMGConnector_Error",
                        format!(
                            "the connection point behind tunnel {} failed while answering: {}",
                            tunnel.id,
                            error_chain(&e)
                        ),
                        "retry later; the admin finds the cause in SMS_Cloud_ProxyConnector.log",
                    )));
                }
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
    let handshake = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(MAX_HEADER_LIST_BYTES)
        .enable_push(false)
        .handshake::<_, Bytes>(stream);
    let (sender, mut conn) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => {
            return log.warn(&format!(
                "Tunnel from {remote} ({subject}) failed its HTTP/2 handshake: {}",
                error_chain(&e)
            ));
        }
        Err(_) => {
            return log.warn(&format!(
                "Tunnel from {remote} ({subject}) did not finish its HTTP/2 handshake within {} s",
                HANDSHAKE_TIMEOUT.as_secs()
            ));
        }
    };
    let pings = conn.ping_pong();
    let id = shared.tunnels.ids.fetch_add(1, Ordering::Relaxed) + 1;
    let tunnel = Arc::new(Tunnel {
        id,
        remote,
        subject: subject.clone(),
        sender,
        up: AtomicBool::new(true),
        waiting: AtomicUsize::new(0),
    });
    let count = shared.tunnels.add(Arc::clone(&tunnel));
    log.info(&format!(
        "Tunnel {id} connected from {remote} ({subject}); {count} tunnel(s) connected"
    ));
    let poll = tokio::spawn(poll_settings(Arc::clone(&shared), Arc::clone(&tunnel)));
    // A connection point that stops or is removed closes its tunnels gracefully: that is news,
    // not a fault. `drive`: the requests devices hand over together leave in one write.
    let (reason, fault, stopping) = tokio::select! {
        ended = cmg_tunnel::drive(&mut conn) => match ended {
            Ok(()) => ("the connection point closed it".to_owned(), false, false),
            Err(e) => (error_chain(&e), true, false),
        },
        dead = keep_alive(pings) => (dead, true, false),
        _ = stop.changed() => ("the gateway is shutting down".to_owned(), false, true),
    };
    tunnel.up.store(false, Ordering::Relaxed);
    poll.abort();
    let count = shared.tunnels.remove(id);
    if stopping {
        // Devices are drained by now. Once the last handle on the connection is gone, h2 says
        // GOAWAY and TLS close_notify, so the connection point sees a deliberate close, not a
        // lost tunnel.
        let _ = poll.await;
        drop(tunnel);
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn).await;
    }
    let line = format!(
        "Tunnel {id} from {remote} ({subject}) disconnected: {reason}; {count} tunnel(s) connected"
    );
    if fault {
        log.warn(&line)
    } else {
        log.info(&line)
    }
}

/// Pings the connection point every [`PING_INTERVAL`], busy or idle, and returns why the
/// tunnel counts as dead once a ping goes unanswered for [`PING_TIMEOUT`].
async fn keep_alive(pings: Option<h2::PingPong>) -> String {
    // h2 hands out its pinger once per connection, and this is the only caller.
    let Some(mut pings) = pings else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(PING_INTERVAL).await;
        match tokio::time::timeout(PING_TIMEOUT, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return format!("its keep-alive ping failed: {}", error_chain(&e)),
            Err(_) => {
                return format!(
                    "it did not answer a keep-alive ping within {} s",
                    PING_TIMEOUT.as_secs()
                );
            }
        }
    }
}

/// What a settings long poll brought.
enum Polled {
    Settings(Box<GatewaySettings>),
    /// Nothing changed within the poll's time (`204`).
    Unchanged,
    /// The connection point answered `503`: it is stopping.
    Stopping,
}

/// Keeps a settings long poll going on one tunnel for as long as it is up.
async fn poll_settings(shared: Arc<Shared>, tunnel: Arc<Tunnel>) {
    // The connection point answers within LONG_POLL_SECS; a poll that takes much longer is stuck.
    let limit = Duration::from_secs(LONG_POLL_SECS * 2 + 5);
    loop {
        if !tunnel.is_up() {
            return;
        }
        let uri = match shared.settings_version() {
            Some(v) => format!("https://{}{SETTINGS}?after={v}", shared.config.fqdn),
            None => format!("https://{}{SETTINGS}", shared.config.fqdn),
        };
        let request = match Request::get(uri)
            .header(cmg_proto::mp::relay::GATEWAY, shared.gateway_header.clone())
            .body(Bytes::new())
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
            let response = tunnel
                .send(&request)
                .await
                .map_err(|attempt| match attempt {
                    Attempt::Refused(e) | Attempt::Failed(e) => error_chain(&e),
                })?;
            let status = response.status();
            if status == StatusCode::NO_CONTENT {
                return Ok(Polled::Unchanged);
            }
            if status == StatusCode::SERVICE_UNAVAILABLE {
                return Ok(Polled::Stopping);
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
                .map(|settings| Polled::Settings(Box::new(settings)))
                .map_err(|e| format!("the settings are not valid JSON GatewaySettings: {e}"))
        })
        .await;
        match outcome {
            Ok(Ok(Polled::Settings(settings))) => shared.apply_settings(*settings, tunnel.id),
            Ok(Ok(Polled::Unchanged)) => {}
            Ok(Ok(Polled::Stopping)) => {
                // Its tunnels close once their requests are answered; the others keep polling.
                shared.handler_log.info(&format!(
                    "The connection point behind tunnel {} is stopping",
                    tunnel.id
                ));
                tokio::time::sleep(POLL_RETRY).await;
            }
            Ok(Err(e)) => {
                if !tunnel.is_up() {
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

#[cfg(test)]
mod tests {
    use super::*;

    type Client = (
        SendRequest<Bytes>,
        h2::client::Connection<tokio::io::DuplexStream, Bytes>,
    );

    /// An HTTP/2 client (a gateway's end of a tunnel) connected to an in-memory server.
    async fn pair() -> (
        Client,
        h2::server::Connection<tokio::io::DuplexStream, Bytes>,
    ) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(h2::server::handshake(server_io));
        let client = h2::client::handshake(client_io).await.unwrap();
        (client, server.await.unwrap().unwrap())
    }

    /// A tunnel to an in-memory connection point that answers every request with `204` after
    /// `delay` (never, with `None`), and the number of requests it received.
    async fn tunnel(id: u64, delay: Option<Duration>) -> (Arc<Tunnel>, Arc<AtomicUsize>) {
        let ((sender, client), mut server) = pair().await;
        tokio::spawn(client);
        let received = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&received);
        tokio::spawn(async move {
            let mut unanswered = Vec::new();
            while let Some(Ok((_, mut respond))) = server.accept().await {
                counter.fetch_add(1, Ordering::Relaxed);
                match delay {
                    Some(delay) => {
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            let mut answer = Response::new(());
                            *answer.status_mut() = StatusCode::NO_CONTENT;
                            let _ = respond.send_response(answer, true);
                        });
                    }
                    None => unanswered.push(respond),
                }
            }
        });
        (Arc::new(up(id, sender)), received)
    }

    /// A live tunnel with nothing waiting, sending through `sender`.
    fn up(id: u64, sender: SendRequest<Bytes>) -> Tunnel {
        Tunnel {
            id,
            remote: SocketAddr::from(([127, 0, 0, 1], 10140)),
            subject: format!("CN=connection point {id}"),
            sender,
            up: AtomicBool::new(true),
            waiting: AtomicUsize::new(0),
        }
    }

    /// The gateway's end of a tunnel as h2 sees a TLS stream: vectored writes, each counted.
    struct CountedWrites {
        io: tokio::io::DuplexStream,
        writes: Arc<AtomicUsize>,
    }

    impl tokio::io::AsyncRead for CountedWrites {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl tokio::io::AsyncWrite for CountedWrites {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.poll_write_vectored(cx, &[std::io::IoSlice::new(buf)])
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            let written = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, bufs))?;
            self.writes.fetch_add(1, Ordering::Relaxed);
            Poll::Ready(Ok(written))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    #[test]
    fn small_data_goes_in_frames_h2_copies_and_large_data_in_one() {
        let credential = Bytes::from(vec![b'a'; 881]);
        let frames: Vec<(Bytes, bool)> = data_frames(&credential).collect();
        assert!(frames.iter().all(|(f, _)| f.len() <= COPIED_DATA_FRAME));
        let joined: Vec<u8> = frames.iter().flat_map(|(f, _)| f.to_vec()).collect();
        assert_eq!(joined, credential);
        let ends: Vec<bool> = frames.iter().map(|(_, last)| *last).collect();
        assert_eq!(ends, [false, false, false, true]);

        let report = Bytes::from(vec![b'r'; SMALL_DATA + 1]);
        let frames: Vec<(Bytes, bool)> = data_frames(&report).collect();
        assert_eq!(frames, [(report, true)]);
    }

    /// 32 devices hand over a request each, with a credential in its data, while the tunnel's
    /// connection waits for its turn: they leave in a few writes. With each credential in one
    /// frame, h2 would write every request on its own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn requests_with_credentials_handed_over_together_leave_in_a_few_writes() {
        let (client_io, server_io) = tokio::io::duplex(1024 * 1024);
        let writes = Arc::new(AtomicUsize::new(0));
        let io = CountedWrites {
            io: client_io,
            writes: Arc::clone(&writes),
        };
        let server = tokio::spawn(h2::server::handshake(server_io));
        let (sender, mut conn) = h2::client::handshake(io).await.unwrap();
        let mut server = server.await.unwrap().unwrap();
        let received = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&received);
        tokio::spawn(async move {
            while let Some(Ok((request, mut respond))) = server.accept().await {
                let counter = Arc::clone(&counter);
                tokio::spawn(async move {
                    let mut body = request.into_body();
                    while let Some(Ok(chunk)) = body.data().await {
                        let _ = body.flow_control().release_capacity(chunk.len());
                    }
                    counter.fetch_add(1, Ordering::Relaxed);
                    let _ = respond.send_response(Response::new(()), true);
                });
            }
        });
        let tunnel = Arc::new(up(1, sender));
        tokio::spawn(async move { cmg_tunnel::drive(&mut conn).await });
        // Settle the handshake's own frames before counting.
        let settled = tunnel.send(&get()).await;
        assert!(settled.is_ok());
        tokio::time::sleep(Duration::from_millis(50)).await;
        writes.store(0, Ordering::Relaxed);

        let mut sent = Vec::new();
        for _ in 0..32 {
            let tunnel = Arc::clone(&tunnel);
            let mut request = get();
            *request.body_mut() = Bytes::from(vec![b'a'; 881]);
            sent.push(tokio::spawn(
                async move { tunnel.send(&request).await.is_ok() },
            ));
        }
        for task in sent {
            assert!(task.await.unwrap());
        }
        assert_eq!(received.load(Ordering::Relaxed), 33);
        let requests_written = writes.load(Ordering::Relaxed);
        assert!(
            requests_written <= 8,
            "{requests_written} writes for 32 requests"
        );
    }

    fn get() -> Request<Bytes> {
        Request::get("https://cmg.test/CCM_Proxy_MutualAuth/72057594037927939/SMS_MP/.sms_pol")
            .body(Bytes::new())
            .unwrap()
    }

    #[tokio::test]
    async fn requests_go_round_robin_and_not_to_a_tunnel_that_stopped_answering() {
        let tunnels = Arc::new(Tunnels::default());
        let (first, first_got) = tunnel(1, Some(Duration::ZERO)).await;
        let (second, second_got) = tunnel(2, Some(Duration::ZERO)).await;
        tunnels.add(first);
        tunnels.add(second);
        for _ in 0..4 {
            let (_, answer) = tunnels
                .send(get())
                .await
                .unwrap_or_else(|_| panic!("refused"));
            assert_eq!(answer.status(), StatusCode::NO_CONTENT);
        }
        // Both keeping up: plain round robin.
        assert_eq!(
            (
                first_got.load(Ordering::Relaxed),
                second_got.load(Ordering::Relaxed)
            ),
            (2, 2)
        );

        // A third tunnel whose connection point takes requests and never answers them.
        let (stuck, stuck_got) = tunnel(3, None).await;
        tunnels.add(stuck);
        let mut waiting = Vec::new();
        while stuck_got.load(Ordering::Relaxed) == 0 {
            let tunnels = Arc::clone(&tunnels);
            waiting.push(tokio::spawn(
                async move { tunnels.send(get()).await.is_ok() },
            ));
            tokio::task::yield_now().await;
        }
        for _ in 0..12 {
            let answered = tokio::time::timeout(Duration::from_secs(5), tunnels.send(get()))
                .await
                .expect("a request queued behind the stuck tunnel");
            assert!(answered.is_ok());
        }
        assert_eq!(
            stuck_got.load(Ordering::Relaxed),
            1,
            "one request is stuck, no more"
        );
        for task in waiting {
            task.abort();
        }
    }

    /// A tunnel to an in-memory connection point that refuses every request unprocessed
    /// (`REFUSED_STREAM`), or, with `stream_refused` false, says GOAWAY at once and answers
    /// `204` to the requests it still takes until its connection closes; and the number of
    /// requests it received.
    async fn refusing(id: u64, stream_refused: bool) -> (Arc<Tunnel>, Arc<AtomicUsize>) {
        let ((sender, client), mut server) = pair().await;
        tokio::spawn(client);
        let received = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&received);
        tokio::spawn(async move {
            if !stream_refused {
                server.graceful_shutdown();
            }
            while let Some(Ok((_, mut respond))) = server.accept().await {
                counter.fetch_add(1, Ordering::Relaxed);
                if stream_refused {
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                } else {
                    let mut answer = Response::new(());
                    *answer.status_mut() = StatusCode::NO_CONTENT;
                    let _ = respond.send_response(answer, true);
                }
            }
        });
        (Arc::new(up(id, sender)), received)
    }

    #[tokio::test]
    async fn a_request_the_connection_point_refused_unprocessed_goes_to_the_next_tunnel() {
        let tunnels = Tunnels::default();
        let (refuser, refused) = refusing(1, true).await;
        let (answering, answered) = tunnel(2, Some(Duration::ZERO)).await;
        tunnels.add(Arc::clone(&refuser));
        tunnels.add(answering);
        for _ in 0..4 {
            let Ok((id, answer)) = tunnels.send(get()).await else {
                panic!("a request refused unprocessed was not sent to the other tunnel");
            };
            assert_eq!((id, answer.status()), (2, StatusCode::NO_CONTENT));
        }
        assert!(
            refused.load(Ordering::Relaxed) >= 2,
            "round robin tried both"
        );
        assert_eq!(answered.load(Ordering::Relaxed), 4);
        // Refusing one stream says nothing about the connection.
        assert!(refuser.is_up());
    }

    #[tokio::test]
    async fn a_tunnel_whose_connection_point_said_goaway_is_no_longer_chosen() {
        let tunnels = Tunnels::default();
        let (closing, _) = refusing(1, false).await;
        let (answering, answered) = tunnel(2, Some(Duration::ZERO)).await;
        tunnels.add(Arc::clone(&closing));
        tunnels.add(answering);
        // Every request is answered, by the closing tunnel while it still takes them and by
        // the other once its GOAWAY arrived.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while closing.is_up() {
            assert!(tokio::time::Instant::now() < deadline, "GOAWAY never seen");
            let Ok((_, answer)) = tunnels.send(get()).await else {
                panic!("a request was lost while a tunnel closed gracefully");
            };
            assert_eq!(answer.status(), StatusCode::NO_CONTENT);
        }
        let before = answered.load(Ordering::Relaxed);
        for _ in 0..4 {
            let Ok((id, _)) = tunnels.send(get()).await else {
                panic!("refused");
            };
            assert_eq!(id, 2);
        }
        assert_eq!(answered.load(Ordering::Relaxed), before + 4);
        assert_eq!(tunnels.live(), 1);
    }

    #[tokio::test]
    async fn an_answer_larger_than_the_flow_control_window_arrives_whole() {
        // Four times the 64 KiB window of `pair`'s client: unless the body gives the window back
        // as it is read, the connection point stops after the first 64 KiB and this never ends.
        let sent = Bytes::from(vec![b'x'; 4 * 65_535]);
        let ((sender, client), mut server) = pair().await;
        tokio::spawn(client);
        let body = sent.clone();
        tokio::spawn(async move {
            let Some(Ok((_, mut respond))) = server.accept().await else {
                return;
            };
            let mut stream = respond.send_response(Response::new(()), false).unwrap();
            stream.send_data(body, true).unwrap();
            while server.accept().await.is_some() {}
        });
        let Ok(answer) = up(1, sender).send(&get()).await else {
            panic!("refused");
        };
        let received = tokio::time::timeout(Duration::from_secs(10), answer.into_body().collect())
            .await
            .expect("the whole answer within 10 s")
            .unwrap()
            .to_bytes();
        assert_eq!(received, sent);
    }

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_whose_connection_point_stops_answering_pings_is_dead() {
        // The server side is never polled again, as a connection point whose host froze.
        let ((_sender, mut client), _frozen) = pair().await;
        let pings = client.ping_pong();
        let dead = tokio::select! {
            ended = &mut client => panic!("the connection ended first: {ended:?}"),
            dead = keep_alive(pings) => dead,
        };
        assert_eq!(
            dead, "it did not answer a keep-alive ping within 20 s",
            "{dead}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_that_answers_its_pings_stays_up() {
        let ((_sender, mut client), mut server) = pair().await;
        tokio::spawn(async move { while server.accept().await.is_some() {} });
        let pings = client.ping_pong();
        tokio::select! {
            ended = &mut client => panic!("the connection ended: {ended:?}"),
            dead = keep_alive(pings) => panic!("a live tunnel counted as dead: {dead}"),
            // Five ping intervals.
            () = tokio::time::sleep(PING_INTERVAL * 5) => {}
        }
    }
}
