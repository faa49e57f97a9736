//! The gateway: the internet-facing cloud management gateway (DESIGN §1, §4, §6).
//!
//! - [`device`] terminates devices' TLS (asking for, not requiring, a client certificate),
//!   checks every request against the URL map and the device's token (DESIGN §4), and relays it;
//! - [`tunnel`] accepts connection points (client certificates from the site root only), is the
//!   HTTP/2 client on each tunnel, keeps a settings long poll going and spreads requests over
//!   the tunnels (fewest waiting first, round robin among equals);
//! - [`pki`] decides, once per connection, whether a client certificate chains to a trusted CA
//!   of the CMG and is not revoked (a PKI device needs no token); [`crl`] loads, fetches and
//!   refreshes the CRLs it checks against;
//! - [`policy`] holds the rules as pure functions; [`stats`] the counters behind
//!   `CMGService.log` and the Prometheus metrics; [`limits`] the open-file limit, which caps the
//!   devices an instance holds at once.
//!
//! The gateway stores no device data and holds no secret of the site: its settings (keys,
//! blocked lists, URL map, TLS policy) arrive over the tunnels and only the newest version wins.
//!
//! ```no_run
//! # async fn run() -> Result<(), cmg_gateway::GatewayError> {
//! let config = cmg_gateway::GatewayConfig::load("gateway.toml".as_ref())?;
//! let gateway = cmg_gateway::Gateway::start(config).await?;
//! println!("devices: https://{}", gateway.device_addr());
//! gateway.shutdown().await;
//! # Ok(()) }
//! ```

mod config;
mod crl;
mod device;
mod error;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod h1;
mod limits;
mod pki;
mod policy;
mod stats;
mod tunnel;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use cmg_log::ComponentLog;
use cmg_proto::tunnel::GatewaySettings;
use hyper::header::HeaderValue;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

pub use config::{
    DEFAULT_CRL_REFRESH_SECS, DEFAULT_STATS_INTERVAL_SECS, GatewayConfig, MAX_INSTANCES,
};
pub use device::{MAX_BODY_BYTES, MAX_HEAD_BYTES, MAX_HEADERS, REQUEST_TIMEOUT};
pub use error::{Denial, GatewayError, RelayError};

use policy::Active;

/// Log of requests, refusals, tunnels and settings.
pub const HANDLER_LOG: &str = "CMGHttpHandler";
/// Log of the periodic traffic summary.
pub const SERVICE_LOG: &str = "CMGService";
/// Minimum TLS version for devices until the settings say otherwise.
const DEFAULT_MIN_TLS: &str = "1.2";

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// State shared by every task of one gateway instance.
pub(crate) struct Shared {
    config: GatewayConfig,
    handler_log: ComponentLog,
    service_log: ComponentLog,
    active: RwLock<Option<Arc<Active>>>,
    tunnels: tunnel::Tunnels,
    stats: stats::Stats,
    /// CRLs for PKI client certificates.
    crls: crl::CrlStore,
    /// The device-side TLS acceptor and the minimum TLS version it enforces.
    device_tls: RwLock<(String, TlsAcceptor)>,
    cert_pem: String,
    key_pem: String,
    /// The CMG name as the `x-cmg-gateway` header value.
    gateway_header: HeaderValue,
    /// The CMG's name as the authority of relayed URLs, parsed once.
    authority: hyper::http::uri::Authority,
}

impl Shared {
    fn active(&self) -> Option<Arc<Active>> {
        self.active
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn settings_version(&self) -> Option<i64> {
        self.active
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|a| a.settings.version)
    }

    fn device_acceptor(&self) -> TlsAcceptor {
        self.device_tls
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }

    /// Puts settings in force if they are newer than the ones in force.
    fn apply_settings(&self, settings: GatewaySettings, tunnel: u64) {
        let version = settings.version;
        if self.settings_version().is_some_and(|v| v >= version) {
            return;
        }
        let active = Arc::new(Active::new(settings));
        let previous = {
            let mut slot = self.active.write().unwrap_or_else(|p| p.into_inner());
            let previous = slot.as_ref().map(|a| a.settings.version);
            if previous.is_some_and(|v| v >= version) {
                return;
            }
            *slot = Some(Arc::clone(&active));
            previous
        };
        let s = &active.settings;
        self.handler_log.info(&format!(
            "Settings version {} -> {version} (from tunnel {tunnel}): {} verification key(s), \
             {} mapped URL(s), {} management point(s), {} blocked bulk token(s), {} blocked \
             device(s), {}, CRL check {}, minimum TLS {}",
            previous.map_or_else(|| "none".to_owned(), |v| v.to_string()),
            active.key_count,
            s.url_map.len(),
            s.management_points.len(),
            s.blocked_bulk_tokens.len(),
            s.blocked_devices.len(),
            active.trust.as_ref().map_or_else(
                || "no trusted CA for PKI client certificates".to_owned(),
                |t| {
                    let (anchors, intermediates) = t.counts();
                    format!(
                        "{anchors} trusted CA anchor(s) and {intermediates} intermediate(s) for \
                         PKI client certificates"
                    )
                }
            ),
            if s.crl_check { "on" } else { "off" },
            s.min_tls,
        ));
        if s.crl_check && active.trust.is_some() {
            self.crls.wake.notify_one();
        }
        for problem in &active.key_problems {
            self.handler_log
                .error(&format!("Settings version {version}: {problem}"));
        }
        if s.cmg != self.config.name {
            self.handler_log.warn(&format!(
                "Settings version {version} are for CMG '{}', but this gateway is '{}'",
                s.cmg, self.config.name
            ));
        }
        self.apply_min_tls(&s.min_tls);
    }

    fn apply_min_tls(&self, min_tls: &str) {
        if self.device_tls.read().unwrap_or_else(|p| p.into_inner()).0 == min_tls {
            return;
        }
        match cmg_pki::tls::server_config_min_tls(
            &self.cert_pem,
            &self.key_pem,
            min_tls,
            self.config.device_alpn(),
        ) {
            Ok(config) => {
                *self.device_tls.write().unwrap_or_else(|p| p.into_inner()) =
                    (min_tls.to_owned(), TlsAcceptor::from(config));
                self.handler_log.info(&format!(
                    "Devices now need TLS {min_tls} or later on new connections"
                ));
            }
            Err(e) => self.handler_log.error(&format!(
                "Cannot apply the minimum TLS version from the settings: {e}; keeping the current one"
            )),
        }
    }
}

/// A running gateway instance. Dropping it does not stop it; call [`Gateway::shutdown`].
pub struct Gateway {
    shared: Arc<Shared>,
    device_addr: SocketAddr,
    tunnel_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    stop_devices: watch::Sender<bool>,
    stop_tunnels: watch::Sender<bool>,
    device_task: JoinHandle<()>,
    tunnel_task: JoinHandle<()>,
    background: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("name", &self.shared.config.name)
            .field("device_addr", &self.device_addr)
            .field("tunnel_addr", &self.tunnel_addr)
            .field("metrics_addr", &self.metrics_addr)
            .finish()
    }
}

fn read(what: &'static str, path: &std::path::Path) -> Result<String, GatewayError> {
    std::fs::read_to_string(path).map_err(|source| GatewayError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

async fn bind(
    what: &'static str,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), GatewayError> {
    let fail = |source| GatewayError::Listen { what, addr, source };
    let listener = TcpListener::bind(addr).await.map_err(fail)?;
    let local = listener.local_addr().map_err(fail)?;
    Ok((listener, local))
}

impl Gateway {
    /// Reads the certificates, binds every port and starts serving. Devices get 503 until the
    /// first settings arrive over a tunnel.
    pub async fn start(config: GatewayConfig) -> Result<Gateway, GatewayError> {
        config
            .validate()
            .map_err(|reason| GatewayError::Config { path: None, reason })?;
        let gateway_header =
            HeaderValue::from_bytes(config.name.as_bytes()).map_err(|_| GatewayError::Config {
                path: None,
                reason: "'name' cannot be sent in an HTTP header".into(),
            })?;
        let authority = config
            .fqdn
            .parse::<hyper::http::uri::Authority>()
            .map_err(|_| GatewayError::Config {
                path: None,
                reason: format!("'fqdn' ({}) is not a valid host name", config.fqdn),
            })?;
        let cert_pem = read("the server certificate", &config.server_cert)?;
        let key_pem = read("the server key", &config.server_key)?;
        let root_pem = read("the site root certificate", &config.site_root)?;
        let device_tls = cmg_pki::tls::server_config_min_tls(
            &cert_pem,
            &key_pem,
            DEFAULT_MIN_TLS,
            config.device_alpn(),
        )?;
        let tunnel_tls = cmg_pki::tls::tunnel_server_config(&cert_pem, &key_pem, &root_pem)?;
        let open_log = |component: &str| {
            ComponentLog::open(&config.log_dir, component).map_err(|source| GatewayError::Logs {
                path: config.log_dir.clone(),
                source,
            })
        };
        let handler_log = open_log(HANDLER_LOG)?;
        let service_log = open_log(SERVICE_LOG)?;

        let (device_listener, device_addr) = bind("device HTTPS", config.listen).await?;
        let (tunnel_listener, tunnel_addr) = bind("tunnel", config.tunnel_listen).await?;
        let metrics = match config.metrics_listen {
            Some(addr) => Some(bind("metrics", addr).await?),
            None => None,
        };
        let metrics_addr = metrics.as_ref().map(|(_, a)| *a);

        let shared = Arc::new(Shared {
            handler_log,
            service_log,
            active: RwLock::new(None),
            tunnels: tunnel::Tunnels::default(),
            stats: stats::Stats::default(),
            crls: crl::CrlStore::default(),
            device_tls: RwLock::new((DEFAULT_MIN_TLS.to_owned(), TlsAcceptor::from(device_tls))),
            cert_pem,
            key_pem,
            gateway_header,
            authority,
            config,
        });
        crl::load_files(&shared).map_err(|reason| GatewayError::Config { path: None, reason })?;
        // Before the first connection is accepted: each one is a file descriptor.
        let open_file_limit = limits::raise_open_file_limit();
        let (stop_devices, devices_stopped) = watch::channel(false);
        let (stop_tunnels, tunnels_stopped) = watch::channel(false);
        let device_task = tokio::spawn(device::serve(
            device_listener,
            Arc::clone(&shared),
            devices_stopped.clone(),
        ));
        let tunnel_task = tokio::spawn(tunnel::serve(
            tunnel_listener,
            TlsAcceptor::from(tunnel_tls),
            Arc::clone(&shared),
            tunnels_stopped,
        ));
        let mut background = vec![
            tokio::spawn(report_traffic(Arc::clone(&shared), devices_stopped.clone())),
            tokio::spawn(crl::run(Arc::clone(&shared), devices_stopped.clone())),
        ];
        if let Some((listener, _)) = metrics {
            background.push(tokio::spawn(serve_metrics(
                listener,
                Arc::clone(&shared),
                devices_stopped,
            )));
        }
        let c = &shared.config;
        shared.handler_log.info(&format!(
            "CMG {} instance {} ({}) listening for devices on https://{device_addr} and for \
             connection points on {tunnel_addr}{}{}",
            c.name,
            c.instance,
            c.fqdn,
            metrics_addr.map_or_else(String::new, |a| format!("; metrics on http://{a}/metrics")),
            open_file_limit.map_or_else(String::new, |n| format!(
                "; open-file limit {n}, so at most about {n} device connections at once"
            )),
        ));
        Ok(Gateway {
            shared,
            device_addr,
            tunnel_addr,
            metrics_addr,
            stop_devices,
            stop_tunnels,
            device_task,
            tunnel_task,
            background,
        })
    }

    /// Where devices connect (HTTPS).
    pub fn device_addr(&self) -> SocketAddr {
        self.device_addr
    }

    /// Where connection points connect.
    pub fn tunnel_addr(&self) -> SocketAddr {
        self.tunnel_addr
    }

    /// Where `GET /metrics` is served, if configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// How many tunnels are up.
    pub fn tunnels(&self) -> usize {
        self.shared.tunnels.live()
    }

    /// Version of the settings in force; `None` until the first arrive.
    pub fn settings_version(&self) -> Option<i64> {
        self.shared.settings_version()
    }

    /// The settings in force.
    pub fn settings(&self) -> Option<GatewaySettings> {
        self.shared.active().map(|a| a.settings.clone())
    }

    /// Stops at once, as a crash or `kill -9` would: device connections and tunnels are cut
    /// without a word (no GOAWAY, no TLS `close_notify`).
    pub fn abort(self) {
        for task in [&self.device_task, &self.tunnel_task]
            .into_iter()
            .chain(&self.background)
        {
            task.abort();
        }
    }

    /// Stops accepting devices, lets requests in flight finish (up to [`REQUEST_TIMEOUT`]),
    /// then closes the tunnels and returns.
    pub async fn shutdown(self) {
        let _ = self.stop_devices.send(true);
        let _ = self.device_task.await;
        let _ = self.stop_tunnels.send(true);
        let _ = self.tunnel_task.await;
        for task in self.background {
            task.abort();
            let _ = task.await;
        }
        self.shared.handler_log.info(&format!(
            "CMG {} instance {} stopped",
            self.shared.config.name, self.shared.config.instance
        ));
    }
}

/// Writes the traffic summary to `CMGService.log` every `stats_interval_secs`.
async fn report_traffic(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let period = Duration::from_secs(shared.config.stats_interval_secs);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        for line in shared.stats.interval_report(period, shared.tunnels.live()) {
            shared.service_log.info(&line);
        }
    }
}

/// `GET /metrics` in the Prometheus text format, over plain HTTP/1.1.
async fn serve_metrics(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let shared = Arc::clone(&shared);
                    async move {
                        let response = if request.uri().path() == "/metrics" {
                            let text = shared
                                .stats
                                .prometheus(shared.tunnels.live(), shared.settings_version());
                            Response::builder()
                                .header(
                                    hyper::header::CONTENT_TYPE,
                                    "text/plain; version=0.0.4; charset=utf-8",
                                )
                                .body(http_body_util::Full::new(hyper::body::Bytes::from(text)))
                        } else {
                            Response::builder().status(StatusCode::NOT_FOUND).body(
                                http_body_util::Full::new(hyper::body::Bytes::from_static(
                                    b"only /metrics is served here\n",
                                )),
                            )
                        };
                        Ok::<_, Infallible>(response.unwrap_or_default())
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(device::HANDSHAKE_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}
