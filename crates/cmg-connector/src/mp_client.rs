//! The connection point's HTTPS client for management points on other hosts (DESIGN §6): mutual
//! TLS with the connection point's certificate, HTTP/1.1 keep-alive connections pooled per MP.
//!
//! hyper's client connections are driven directly, so a relayed request pays for HTTP and TLS
//! and for nothing a general-purpose client adds (URL parsing, redirect policy, middleware):
//! on the 2-core bench that was about a tenth of a relayed request's CPU.
//!
//! A request is sent at most once. Only when nothing went out — the MP could not be reached, or a
//! pooled connection closed before the request was written — is it sent on a new connection, or
//! may the relay try another MP ([`MpCallError::is_connect`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cmg_log::error_chain;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HOST, HeaderValue};
use hyper::http::response::Parts;
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;

/// Connecting (TCP and TLS) must finish within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A request (connection, request and whole answer) must finish within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection idle this long is closed rather than reused: well before the MP's own idle
/// close (`cmg_site::mp::IDLE_TIMEOUT`), so that no request meets a connection being closed.
const POOL_IDLE: Duration = Duration::from_secs(50);
/// Idle connections kept per MP; one finishing past this is closed.
const POOL_MAX_IDLE: usize = 256;

/// Why a call to a management point failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MpCallError {
    /// Nothing was sent: the MP may be tried again or another one used.
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    /// The MP's URL in the site's settings cannot be called.
    #[error("the management point URL '{url}' is not https://HOST[:PORT]")]
    BadUrl { url: String },
    /// The request went out (or may have): it must not be sent again.
    #[error("the request to {url} failed: {reason}")]
    Failed { url: String, reason: String },
    #[error("{url} did not answer within {} s", REQUEST_TIMEOUT.as_secs())]
    TimedOut { url: String },
}

impl MpCallError {
    /// The request did not reach the MP, so another MP may take it.
    pub fn is_connect(&self) -> bool {
        matches!(self, Self::Connect { .. } | Self::BadUrl { .. })
    }
}

/// Where an MP's URL (`https://HOST[:PORT]`, as the site keeps it) points.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    /// Host name or IP address, without brackets.
    host: String,
    port: u16,
    /// `Host` header: the URL's authority.
    authority: HeaderValue,
}

impl Target {
    fn parse(url: &str) -> Option<Target> {
        let uri: Uri = url.parse().ok()?;
        if uri.scheme_str() != Some("https")
            || !matches!(uri.path(), "" | "/")
            || uri.query().is_some()
        {
            return None;
        }
        let authority = uri.authority()?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return None;
        }
        Some(Target {
            host: host.to_owned(),
            port: authority.port_u16().unwrap_or(443),
            authority: HeaderValue::from_str(authority.as_str()).ok()?,
        })
    }
}

/// One MP's idle connections, oldest first, with when each was last used.
struct Pool {
    target: Target,
    name: ServerName<'static>,
    idle: Mutex<VecDeque<(SendRequest<Full<Bytes>>, Instant)>>,
}

impl Pool {
    /// The most recently used connection, so that the others age out.
    fn take(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((sender, since)) = idle.pop_back() {
            if !sender.is_closed() && since.elapsed() < POOL_IDLE {
                return Some(sender);
            }
        }
        None
    }

    fn put(&self, sender: SendRequest<Full<Bytes>>) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        // Only the oldest can have aged out; closed ones are dropped when they come up.
        while idle.front().is_some_and(|(s, since)| {
            s.is_closed() || now.saturating_duration_since(*since) >= POOL_IDLE
        }) {
            idle.pop_front();
        }
        if idle.len() < POOL_MAX_IDLE {
            idle.push_back((sender, now));
        }
    }
}

pub(crate) struct MpClient {
    tls: tokio_rustls::TlsConnector,
    /// By MP base URL, parsed once.
    pools: Mutex<HashMap<String, Arc<Pool>>>,
    /// Largest answer read.
    max_reply: usize,
}

impl MpClient {
    /// `tls` presents the connection point's certificate and trusts the site root.
    pub fn new(tls: Arc<rustls::ClientConfig>, max_reply: usize) -> MpClient {
        MpClient {
            tls: tokio_rustls::TlsConnector::from(tls),
            pools: Mutex::new(HashMap::new()),
            max_reply,
        }
    }

    fn pool(&self, url: &str) -> Result<Arc<Pool>, MpCallError> {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pool) = pools.get(url) {
            return Ok(Arc::clone(pool));
        }
        let bad = || MpCallError::BadUrl {
            url: url.to_owned(),
        };
        let target = Target::parse(url).ok_or_else(bad)?;
        let name = ServerName::try_from(target.host.clone()).map_err(|_| bad())?;
        let pool = Arc::new(Pool {
            target,
            name,
            idle: Mutex::new(VecDeque::new()),
        });
        pools.insert(url.to_owned(), Arc::clone(&pool));
        Ok(pool)
    }

    /// Sends `request` (its URI in origin form) to the MP at `url` and reads the whole answer.
    pub async fn call(
        &self,
        url: &str,
        mut request: Request<Full<Bytes>>,
    ) -> Result<(Parts, Bytes), MpCallError> {
        let pool = self.pool(url)?;
        request
            .headers_mut()
            .insert(HOST, pool.target.authority.clone());
        tokio::time::timeout(REQUEST_TIMEOUT, self.send(&pool, url, request))
            .await
            .map_err(|_| MpCallError::TimedOut {
                url: url.to_owned(),
            })?
    }

    async fn send(
        &self,
        pool: &Pool,
        url: &str,
        mut request: Request<Full<Bytes>>,
    ) -> Result<(Parts, Bytes), MpCallError> {
        loop {
            let (mut sender, fresh) = match pool.take() {
                Some(sender) => (sender, false),
                None => (self.connect(pool, url).await?, true),
            };
            // A pooled connection is ready once its task has seen the last answer end; one
            // that closed meanwhile is skipped.
            if sender.ready().await.is_err() {
                if fresh {
                    return Err(MpCallError::Connect {
                        url: url.to_owned(),
                        reason: "the connection closed at once".into(),
                    });
                }
                continue;
            }
            let response = match sender.try_send_request(request).await {
                Ok(response) => response,
                Err(mut e) => match e.take_message() {
                    // Not written: a pooled connection closed under it; a new one next.
                    Some(back) if !fresh => {
                        request = back;
                        continue;
                    }
                    Some(_) => {
                        return Err(MpCallError::Connect {
                            url: url.to_owned(),
                            reason: error_chain(e.error()),
                        });
                    }
                    None => {
                        return Err(MpCallError::Failed {
                            url: url.to_owned(),
                            reason: error_chain(e.error()),
                        });
                    }
                },
            };
            let (head, body) = response.into_parts();
            let body = Limited::new(body, self.max_reply)
                .collect()
                .await
                .map_err(|e| MpCallError::Failed {
                    url: url.to_owned(),
                    reason: format!("reading the answer failed: {}", error_chain(&*e)),
                })?
                .to_bytes();
            pool.put(sender);
            return Ok((head, body));
        }
    }

    async fn connect(
        &self,
        pool: &Pool,
        url: &str,
    ) -> Result<SendRequest<Full<Bytes>>, MpCallError> {
        let target = &pool.target;
        let connecting = async {
            let tcp = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
                .await
                .map_err(|e| e.to_string())?;
            let _ = tcp.set_nodelay(true);
            let tls = self
                .tls
                .connect(pool.name.clone(), tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| format!("HTTP/1.1: {}", error_chain(&e)))?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(
                        "connection to a management point ended: {}",
                        error_chain(&e)
                    );
                }
            });
            Ok::<_, String>(sender)
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(sender)) => Ok(sender),
            Ok(Err(reason)) => Err(MpCallError::Connect {
                url: url.to_owned(),
                reason,
            }),
            Err(_) => Err(MpCallError::Connect {
                url: url.to_owned(),
                reason: format!("no connection within {} s", CONNECT_TIMEOUT.as_secs()),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use cmg_pki::{KeyAlgorithm, Role, SiteAuthority};
    use hyper::{Response, StatusCode};

    use super::*;

    /// How the test MP treats a connection.
    #[derive(Clone, Copy)]
    enum Mp {
        /// Answers every request, keeping the connection.
        KeepAlive,
        /// Answers one request, then closes the connection.
        OneRequest,
        /// Reads the request, then closes the connection without answering.
        Vanish,
    }

    /// A TLS MP on loopback; counts the connections it accepted and the requests it read.
    async fn mp(behaviour: Mp) -> (MpClient, String, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let ca = SiteAuthority::generate("TST").unwrap();
        let issue = |role| ca.issue("TST", &role, KeyAlgorithm::EcdsaP256).unwrap();
        let server = issue(Role::ManagementPoint {
            hostnames: vec!["127.0.0.1".into()],
        });
        let client = issue(Role::ConnectionPoint);
        let acceptor = tokio_rustls::TlsAcceptor::from(
            cmg_pki::tls::server_config(server.cert_pem(), server.key_pem()).unwrap(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let (accepted, requests) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (accepted_, requests_) = (Arc::clone(&accepted), Arc::clone(&requests));
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                accepted_.fetch_add(1, Ordering::SeqCst);
                let (acceptor, requests) = (acceptor.clone(), Arc::clone(&requests_));
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |_request| {
                        requests.fetch_add(1, Ordering::SeqCst);
                        async move {
                            if matches!(behaviour, Mp::Vanish) {
                                return Err("gone");
                            }
                            Ok(Response::new(Full::new(Bytes::from_static(b"{}"))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(matches!(behaviour, Mp::KeepAlive))
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        let tls = cmg_pki::tls::client_config(
            client.cert_pem(),
            client.key_pem(),
            &[ca.credential().cert_pem()],
            &[b"http/1.1"],
        )
        .unwrap();
        (MpClient::new(tls, 1024), url, accepted, requests)
    }

    async fn get(client: &MpClient, url: &str) -> Result<StatusCode, MpCallError> {
        let request = Request::get("/SMS_MP/.sms_pol")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let answer = client.call(url, request).await?;
        Ok(answer.0.status)
    }

    /// Three requests in a row, all answered; how many connections the MP accepted for them.
    async fn connections_for_three_requests(behaviour: Mp) -> usize {
        let (client, url, accepted, requests) = mp(behaviour).await;
        for _ in 0..3 {
            assert_eq!(get(&client, &url).await.unwrap(), StatusCode::OK);
        }
        assert_eq!(requests.load(Ordering::SeqCst), 3);
        accepted.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn a_connection_is_kept_and_reused() {
        assert_eq!(connections_for_three_requests(Mp::KeepAlive).await, 1);
    }

    #[tokio::test]
    async fn a_connection_the_mp_closed_is_replaced_before_anything_is_sent() {
        assert_eq!(connections_for_three_requests(Mp::OneRequest).await, 3);
    }

    #[tokio::test]
    async fn a_request_the_mp_read_is_never_sent_again() {
        let (client, url, _, requests) = mp(Mp::Vanish).await;
        let failed = get(&client, &url).await.unwrap_err();
        assert!(!failed.is_connect(), "{failed}");
        assert_eq!(requests.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_mp_nobody_listens_for_counts_as_not_reached() {
        let (client, _, _, _) = mp(Mp::KeepAlive).await;
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let failed = get(&client, &format!("https://{closed}"))
            .await
            .unwrap_err();
        assert!(failed.is_connect(), "{failed}");
        let unusable = get(&client, "http://127.0.0.1:1").await.unwrap_err();
        assert!(unusable.is_connect(), "{unusable}");
    }

    #[test]
    fn mp_urls_parse_into_host_and_port() {
        let t = Target::parse("https://mp.contoso.test").expect("plain");
        assert_eq!((t.host.as_str(), t.port), ("mp.contoso.test", 443));
        assert_eq!(t.authority, "mp.contoso.test");
        let t = Target::parse("https://127.0.0.1:8443/").expect("port");
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 8443));
        assert_eq!(t.authority, "127.0.0.1:8443");
        let t = Target::parse("https://[::1]:9443").expect("IPv6");
        assert_eq!((t.host.as_str(), t.port), ("::1", 9443));
        assert_eq!(t.authority, "[::1]:9443");
        for bad in [
            "http://mp.contoso.test",
            "mp.contoso.test",
            "https://",
            "https://mp/sms",
            "https://mp/?a=b",
        ] {
            assert_eq!(Target::parse(bad), None, "{bad}");
        }
    }
}
