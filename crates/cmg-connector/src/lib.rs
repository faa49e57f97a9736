//! The connection point (DESIGN §6): dials **out** from the site to every gateway instance's
//! tunnel port with the site-issued connection point certificate, and on each tunnel serves
//! HTTP/2 — roles reversed — so that device requests reach the site without the site accepting
//! a single inbound internet connection.
//!
//! On a tunnel it answers the gateway's settings long poll from the site's state, and relays
//! device requests to the management point named in the URL (if it allows CMG traffic), over
//! mutual TLS with the connection point certificate, passing on the identity the gateway
//! verified. Each tunnel is watched with HTTP/2 pings; a lost tunnel is dialled again with
//! backoff and jitter.
//!
//! It holds none of the site's private keys: it opens the site with
//! [`Site::open_for_connection_point`] (on the site server, or on another host from the directory
//! `cmg admin connector add` writes) and presents a connection point certificate the site trusts.
//! When the site stops trusting that certificate (`cmg admin connector remove`), it closes its
//! tunnels and stops dialling.
//!
//! It must not authenticate devices (the gateway does, and the MP again) nor store anything.

mod mp_client;
mod relay;
mod report;
mod tunnel;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cmg_log::ComponentLog;
use cmg_site::{Site, StateWatch};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A gateway instance to keep a tunnel to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelTarget {
    /// The instance's tunnel address (DESIGN §2: port 10140 + instance − 1).
    pub addr: SocketAddr,
    /// The name its server certificate carries (the CMG's FQDN).
    pub server_name: String,
}

#[derive(Debug, Clone)]
pub struct ConnectorOptions {
    /// The CMG this connection point serves.
    pub cmg: String,
    pub targets: Vec<TunnelTarget>,
    /// PEM roots that the gateways' server certificates chain to.
    pub gateway_roots: Vec<String>,
    /// Log `Switched to internal URL …` for every relayed request.
    pub verbose: bool,
    /// Longest wait between two attempts to dial a lost tunnel.
    pub max_backoff: Duration,
    /// This connection point's name in traffic reports (default: the host name).
    pub name: String,
    /// How often traffic is reported to the site (DESIGN §2: every 5 minutes).
    pub report_interval: Duration,
    /// Tunnels kept to each gateway instance. Each tunnel is one TLS connection whose HTTP/2
    /// framing and encryption run on one task at each end, so one tunnel caps an instance at
    /// what one core can frame; a few spread the load over the cores (DESIGN §6: "a few
    /// long-lived connections").
    pub tunnels_per_instance: usize,
    /// Management points running in this process (`cmg up`): relayed requests for them skip
    /// the TLS hop; every other MP is called over mutual TLS.
    pub in_process: Vec<cmg_site::mp::InProcessMp>,
}

/// Default [`ConnectorOptions::tunnels_per_instance`].
pub const TUNNELS_PER_INSTANCE: usize = 2;
/// Most tunnels per instance that may be asked for.
pub const MAX_TUNNELS_PER_INSTANCE: usize = 16;

/// Traffic is reported every 5 minutes (DESIGN §2).
pub const REPORT_INTERVAL: Duration = Duration::from_secs(300);
/// How long a stopping connection point waits for the answers still in flight on its tunnels:
/// as long as a gateway waits for one.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Resolves once the connection point is stopping (at once if it already is).
async fn stopping(stop: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which only happens once everything stops.
    let _ = stop.wait_for(|s| *s).await;
}

impl ConnectorOptions {
    pub fn new(cmg: &str, targets: Vec<TunnelTarget>, gateway_roots: Vec<String>) -> Self {
        ConnectorOptions {
            cmg: cmg.to_owned(),
            targets,
            gateway_roots,
            verbose: false,
            max_backoff: Duration::from_secs(60),
            name: host_name(),
            report_interval: REPORT_INTERVAL,
            tunnels_per_instance: TUNNELS_PER_INSTANCE,
            in_process: Vec::new(),
        }
    }
}

impl ConnectorOptions {
    /// The tunnels of every instance of a CMG definition. The gateways' server certificates are
    /// trusted through the CA certificates that follow the leaf in the definition's chain, plus
    /// `extra_roots` (PEM) for a chain from a public CA.
    pub fn for_cmg(
        def: &cmg_site::cmg::CmgDefinition,
        extra_roots: Vec<String>,
    ) -> Result<Self, ConnectorError> {
        let mut targets = Vec::new();
        for (host, port) in def.tunnel_endpoints() {
            let addr = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
                .ok()
                .and_then(|mut addrs| addrs.next())
                .ok_or_else(|| ConnectorError::Resolve(format!("{host}:{port}")))?;
            targets.push(TunnelTarget {
                addr,
                server_name: def.fqdn.clone(),
            });
        }
        let chain_cas: Vec<String> = def
            .server_chain_pem
            .split_inclusive("-----END CERTIFICATE-----")
            .skip(1)
            .filter(|pem| pem.contains("BEGIN CERTIFICATE"))
            .map(str::to_owned)
            .collect();
        let roots: Vec<String> = chain_cas.into_iter().chain(extra_roots).collect();
        if roots.is_empty() {
            return Err(ConnectorError::NoGatewayRoots(def.name.clone()));
        }
        Ok(ConnectorOptions::new(&def.name, targets, roots))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    #[error("cannot resolve the tunnel address {0}; check the CMG's tunnel host")]
    Resolve(String),
    #[error(
        "no CA certificate to check the gateways of CMG {0} against: put the CA certificates after the server certificate in its chain, or give --gateway-root FILE"
    )]
    NoGatewayRoots(String),
    #[error("cannot read the connection point certificate {path}: {source}")]
    Credential {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Pki(#[from] cmg_pki::PkiError),
    #[error("cannot open the connection point log in {path}: {source}")]
    Log {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "the site does not trust this connection point's certificate {thumbprint}: it was removed (`cmg admin connector remove`) or belongs to another site; on the site server, add a connection point with `cmg admin connector add` and use the directory it writes"
    )]
    NotTrusted { thumbprint: String },
}

/// A running connection point. Stop it with [`Connector::shutdown`].
pub struct Connector {
    stop: watch::Sender<bool>,
    tunnels: Vec<JoinHandle<()>>,
    /// Makes the last traffic report once the tunnels are closed, so that the requests
    /// answered while they drained are counted too.
    report_stop: watch::Sender<bool>,
    reporter: JoinHandle<()>,
    trust: JoinHandle<()>,
    live: Arc<AtomicUsize>,
    /// Turns true when the site stopped trusting this connection point's certificate.
    removed: watch::Receiver<bool>,
}

impl Connector {
    pub async fn start(
        site: Arc<Site>,
        state: StateWatch,
        options: ConnectorOptions,
    ) -> Result<Connector, ConnectorError> {
        let data = site.data();
        let (crt, key) = data.credential("connection-point");
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p).map_err(|source| ConnectorError::Credential {
                path: p.display().to_string(),
                source,
            })
        };
        let (cert_pem, key_pem) = (read(&crt)?, read(&key)?);
        let thumbprint = cmg_pki::thumbprint_sha256(&cmg_pki::pem_to_der(
            &cert_pem,
            "the connection point certificate",
        )?);
        if !state.borrow().connection_points.contains(&thumbprint) {
            return Err(ConnectorError::NotTrusted { thumbprint });
        }
        let site_root = read(&data.pki_dir().join("site-root.crt"))?;
        let roots: Vec<&str> = options.gateway_roots.iter().map(String::as_str).collect();
        let tls = cmg_pki::tls::client_config(&cert_pem, &key_pem, &roots, &[b"h2"])?;
        let (stop_sender, stopped) = watch::channel(false);
        let log =
            ComponentLog::open(&data.logs_dir(), "SMS_Cloud_ProxyConnector").map_err(|source| {
                ConnectorError::Log {
                    path: data.logs_dir().display().to_string(),
                    source,
                }
            })?;
        let mp_client = mp_client::MpClient::new(
            cmg_pki::tls::client_config(&cert_pem, &key_pem, &[&site_root], &[b"http/1.1"])?,
            relay::MAX_REPLY,
        );
        let (removed_tx, removed) = watch::channel(false);
        let trust = tokio::spawn(watch_trust(
            state.clone(),
            thumbprint,
            stop_sender.clone(),
            removed_tx,
            log.clone(),
        ));
        let relay = Arc::new(relay::Relay::new(
            site,
            state,
            &options,
            mp_client,
            log.clone(),
            stopped.clone(),
        ));
        let live = Arc::new(AtomicUsize::new(0));
        let per_instance = options
            .tunnels_per_instance
            .clamp(1, MAX_TUNNELS_PER_INSTANCE);
        let tunnels = options
            .targets
            .iter()
            .flat_map(|target| std::iter::repeat_n(target, per_instance))
            .map(|target| {
                tokio::spawn(tunnel::keep(
                    target.clone(),
                    tokio_rustls::TlsConnector::from(Arc::clone(&tls)),
                    Arc::clone(&relay),
                    stopped.clone(),
                    Arc::clone(&live),
                    log.clone(),
                    options.max_backoff,
                ))
            })
            .collect();
        let (report_stop, report_stopped) = watch::channel(false);
        let reporter = tokio::spawn(report::every(
            relay,
            options.name.clone(),
            options.report_interval,
            report_stopped,
        ));
        Ok(Connector {
            stop: stop_sender,
            tunnels,
            report_stop,
            reporter,
            trust,
            live,
            removed,
        })
    }

    /// Resolves when the site stopped trusting this connection point's certificate (it was
    /// removed); its tunnels are closed by then. Never resolves otherwise.
    pub async fn removed(&self) {
        let mut removed = self.removed.clone();
        if removed.wait_for(|r| *r).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// How many tunnels are up now.
    pub fn connected(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Stops dialling and closes every tunnel gracefully: the gateways send no new request to
    /// this connection point, and the ones in flight are answered first (for at most
    /// [`DRAIN_TIMEOUT`]).
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for tunnel in self.tunnels {
            let _ = tunnel.await;
        }
        let _ = self.report_stop.send(true);
        let _ = self.reporter.await;
        let _ = self.trust.await;
    }

    /// Stops at once, as a crash or `kill -9` would: the tunnels close without a word to the
    /// gateways, and the requests in flight on them are lost (the gateways answer them `502`).
    /// Traffic counted since the last report is lost, too.
    pub fn abort(self) {
        for task in self.tunnels.iter().chain([&self.reporter, &self.trust]) {
            task.abort();
        }
    }
}

/// Waits until the site's state no longer lists `thumbprint` among its connection points, then
/// closes every tunnel (the gateways send their requests to the other connection points) and
/// says so. Returns early when the connector stops.
async fn watch_trust(
    mut state: StateWatch,
    thumbprint: String,
    stop: watch::Sender<bool>,
    removed: watch::Sender<bool>,
    log: ComponentLog,
) {
    let mut stopped = stop.subscribe();
    let untrusted = state.wait_for(|s| !s.connection_points.contains(&thumbprint));
    tokio::select! {
        result = untrusted => {
            if result.is_ok() {
                log.error(&format!(
                    "The site no longer trusts this connection point's certificate {thumbprint} (removed with `cmg admin connector remove`); closing every tunnel"
                ));
                let _ = removed.send(true);
                let _ = stop.send(true);
            }
        }
        _ = stopped.wait_for(|s| *s) => {}
    }
}

/// The machine's host name, for traffic reports.
fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "connection-point".into())
}
