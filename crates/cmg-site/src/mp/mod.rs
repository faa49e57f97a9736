//! The management point (DESIGN §5): the client-facing endpoints over HTTPS with the
//! site-issued certificate ("Enhanced HTTP").
//!
//! - [`conn`] accepts TLS connections, learns the device certificate once per connection and
//!   serves HTTP/1.1 and HTTP/2 with time-outs;
//! - [`api`] is the router, request extractors and JSON errors;
//! - [`registration`] and [`tokens`] hold the rules: who may register, who gets a token.
//!
//! Every endpoint answers the same on the intranet and through a gateway; the difference is only
//! where the device identity comes from (the TLS peer, or a connection point's relayed headers).

mod api;
mod conn;
mod registration;
mod tokens;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::{Site, SiteError, StateWatch};

pub use api::MAX_BODY_BYTES;

/// How long a whole request may take, body included; slow clients get 408.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// An idle keep-alive connection is closed after this.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone)]
pub struct MpOptions {
    /// Where to listen, e.g. `127.0.0.1:8443` (port 0 picks a free port).
    pub listen: SocketAddr,
    /// This MP's role ID; it must be listed by `cmg admin mp list`.
    pub role_id: i64,
    /// How long one request may take, body included ([`REQUEST_TIMEOUT`] by default).
    pub request_timeout: Duration,
}

impl MpOptions {
    pub fn new(listen: SocketAddr, role_id: i64) -> Self {
        MpOptions {
            listen,
            role_id,
            request_timeout: REQUEST_TIMEOUT,
        }
    }
}

/// A running management point. Dropping it does not stop it; call [`MpServer::shutdown`].
pub struct MpServer {
    local_addr: SocketAddr,
    role_id: i64,
    router: axum::Router,
    mp: Arc<api::Mp>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl MpServer {
    /// Starts serving. The site's state (`state`) must be kept current by [`crate::watch_state`].
    pub async fn start(
        site: Arc<Site>,
        state: StateWatch,
        options: MpOptions,
    ) -> Result<MpServer, SiteError> {
        // The MP mints client tokens: a site opened for a connection point cannot serve one.
        site.issuer()?;
        let url = state
            .borrow()
            .management_points
            .iter()
            .find(|m| m.role_id == options.role_id)
            .map(|m| m.url.clone())
            .ok_or(SiteError::UnknownMp(options.role_id))?;
        let tls = mp_tls(&site, &url)?;
        let listener = tokio::net::TcpListener::bind(options.listen)
            .await
            .map_err(SiteError::io("listen on", options.listen.to_string()))?;
        let local_addr = listener
            .local_addr()
            .map_err(SiteError::io("listen on", options.listen.to_string()))?;
        let mp = api::Mp::new(Arc::clone(&site), state);
        let router = api::router(Arc::clone(&mp), options.request_timeout);
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(flush_seen_every(Arc::clone(&mp), stopped.clone()));
        let task = tokio::spawn(conn::serve(
            listener,
            tls,
            router.clone(),
            stopped,
            options.request_timeout,
        ));
        site.logs().registration.info(&format!(
            "Management point {} listening on https://{local_addr}",
            options.role_id
        ));
        Ok(MpServer {
            local_addr,
            role_id: options.role_id,
            router,
            mp,
            stop,
            task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// This MP for a connection point in the same process, which then skips the TLS hop:
    /// requests reach the same router with the same rules, the caller being the connection
    /// point certificate with SHA-256 thumbprint `connection_point` (relayed identities are
    /// believed only if the site lists that certificate, exactly as over TLS).
    pub fn in_process(&self, connection_point: String) -> InProcessMp {
        InProcessMp {
            role_id: self.role_id,
            router: self.router.clone(),
            peer: Arc::new(conn::Peer {
                remote: SocketAddr::from(([127, 0, 0, 1], 0)),
                thumbprint: Some(connection_point),
                verified: std::sync::Mutex::new(None),
            }),
        }
    }

    /// Stops accepting, lets requests in flight finish (up to [`REQUEST_TIMEOUT`]), and returns.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        self.mp.flush_seen().await;
    }
}

/// A management point of this process, called without a network hop (see
/// [`MpServer::in_process`]).
#[derive(Clone)]
pub struct InProcessMp {
    role_id: i64,
    router: axum::Router,
    peer: Arc<conn::Peer>,
}

impl std::fmt::Debug for InProcessMp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessMp")
            .field("role_id", &self.role_id)
            .finish_non_exhaustive()
    }
}

impl InProcessMp {
    /// The role ID of the MP it calls.
    pub fn role_id(&self) -> i64 {
        self.role_id
    }

    /// Serves one request (path and query in its URI) as the MP would over HTTPS.
    pub async fn call(
        &self,
        mut request: hyper::Request<axum::body::Body>,
    ) -> hyper::Response<axum::body::Body> {
        use tower_service::Service;
        request.extensions_mut().insert(Arc::clone(&self.peer));
        let mut router = self.router.clone();
        match router.call(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        }
    }
}

/// How often noted last-seen times are written (DESIGN §9: group durable writes).
pub const SEEN_FLUSH: Duration = Duration::from_secs(2);

async fn flush_seen_every(mp: Arc<api::Mp>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SEEN_FLUSH) => mp.flush_seen().await,
            _ = stop.changed() => return,
        }
    }
}

/// The MP's TLS configuration. When its certificate does not cover the host name in the MP's
/// URL (an admin changed it with `cmg admin mp set --url`), the site root issues a new one for
/// that name first, so devices can always check the MP they were told about.
fn mp_tls(site: &Site, url: &str) -> Result<tokio_rustls::TlsAcceptor, SiteError> {
    let data = site.data();
    let (crt, key) = data.credential(crate::layout::MANAGEMENT_POINT);
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p).map_err(SiteError::io("read", p.to_owned()))
    };
    let host = url_host(url);
    let covered = cmg_pki::pem_to_der(&read(&crt)?, "the MP certificate")
        .and_then(|der| cmg_pki::dns_names(&der))
        .map(|names| names.iter().any(|n| cmg_pki::name_matches(n, host)))
        .unwrap_or(false);
    if !covered && host.parse::<std::net::IpAddr>().is_err() {
        let hostnames = vec![host.to_owned(), "localhost".into(), "127.0.0.1".into()];
        let code = &site.record().site_code;
        let cred = site.authority()?.issue(
            code,
            &cmg_pki::Role::ManagementPoint { hostnames },
            cmg_pki::KeyAlgorithm::EcdsaP256,
        )?;
        cmg_pki::write_private_file(&key, cred.key_pem().as_bytes())?;
        std::fs::write(&crt, cred.cert_pem()).map_err(SiteError::io("write", &crt))?;
        site.logs().registration.info(&format!(
            "Issued a new management point certificate for {host}"
        ));
    }
    let config = cmg_pki::tls::server_config(&read(&crt)?, &read(&key)?)?;
    Ok(tokio_rustls::TlsAcceptor::from(config))
}

/// `mp.contoso.com` from `https://mp.contoso.com:8443`.
fn url_host(url: &str) -> &str {
    let rest = url.strip_prefix("https://").unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or(rest);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6);
    }
    authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host)
}

#[cfg(test)]
mod tests {
    #[test]
    fn hosts_come_out_of_mp_urls() {
        assert_eq!(
            super::url_host("https://mp.contoso.com:8443"),
            "mp.contoso.com"
        );
        assert_eq!(super::url_host("https://mp.contoso.com"), "mp.contoso.com");
        assert_eq!(super::url_host("https://[::1]:8443"), "::1");
        assert_eq!(super::url_host("https://127.0.0.1:1"), "127.0.0.1");
    }
}
