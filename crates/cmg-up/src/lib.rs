//! `cmg up`: every role on one machine — site server with its management point, a connection
//! point and the gateway instances — on the embedded database, with a development CA for the
//! gateway's server certificate (DESIGN §1, §11). Re-running reuses the site, the CA and the CMG.
//!
//! It composes the roles' own entry points and owns nothing else: no rules, no wire formats.
//! It is for trying cmg out and for development, so it listens on loopback only.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use cmg_connector::{Connector, ConnectorOptions, TunnelTarget};
use cmg_gateway::{Gateway, GatewayConfig};
use cmg_pki::{KeyAlgorithm, Role, SiteAuthority};
use cmg_site::cmg::{CmgDefinition, TUNNEL_BASE_PORT};
use cmg_site::{
    AdminService, BulkTokenLifetime, DataDir, InitOptions, NewBulkToken, SiteCode, SiteRunOptions,
    SiteServer,
};

/// The CMG that `cmg up` defines.
pub const CMG_NAME: &str = "LocalCMG";
/// The name devices use for it: loopback, covered by the development certificate.
pub const CMG_HOST: &str = "localhost";

#[derive(Debug, Clone)]
pub struct UpOptions {
    pub data: DataDir,
    pub site_code: SiteCode,
    /// Device port of gateway instance 1; instance n uses this + n − 1 (0: any free port).
    pub gateway_port: u16,
    pub mp_port: u16,
    /// Tunnel port of instance 1 (DESIGN §2: 10140); instance n uses this + n − 1 (0: any).
    pub tunnel_port: u16,
    pub instances: u8,
    /// Who runs it, for the audit log.
    pub actor: String,
}

#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error(transparent)]
    Site(#[from] cmg_site::SiteError),
    #[error(transparent)]
    Pki(#[from] cmg_pki::PkiError),
    #[error(transparent)]
    Gateway(#[from] cmg_gateway::GatewayError),
    #[error(transparent)]
    Connector(#[from] cmg_connector::ConnectorError),
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the site did not load its new configuration within 10 s; check the database")]
    Stale,
    #[error(
        "the connection point did not reach every gateway instance within 10 s; check the ports"
    )]
    TunnelsDown,
}

/// Everything running. Stop with [`Up::shutdown`].
pub struct Up {
    pub site: SiteServer,
    pub gateways: Vec<Gateway>,
    connector: Connector,
    pub site_code: String,
    pub hierarchy_id: String,
    /// The development CA devices trust for the gateway (`--trust-ca`).
    pub dev_ca: PathBuf,
    /// The gateway URL of the site's MP: `https://localhost:PORT/CCM_Proxy_MutualAuth/<role ID>`.
    pub cmg_mp_url: String,
}

impl Up {
    pub async fn start(options: UpOptions) -> Result<Up, UpError> {
        let data = options.data.clone();
        if !data.config_file().exists() {
            cmg_site::init_site(InitOptions {
                data: data.clone(),
                site_code: options.site_code.clone(),
                token_key: KeyAlgorithm::EcdsaP256,
                db: None,
                actor: options.actor.clone(),
            })
            .await?;
        }
        let run = SiteRunOptions::new(SocketAddr::from(([127, 0, 0, 1], options.mp_port)));
        let site = SiteServer::start(data.clone(), run).await?;
        let admin = AdminService::open(data.clone(), options.actor.clone()).await?;
        let mp_url = format!("https://localhost:{}", site.mp_addr().port());
        admin
            .set_management_point(site.mp_role_id(), Some(&mp_url), Some(true))
            .await?;

        let dev = DevPki::load_or_create(&data)?;
        let mut gateways = Vec::new();
        for n in 0..options.instances {
            let port = |base: u16| if base == 0 { 0 } else { base + u16::from(n) };
            let config = GatewayConfig {
                name: CMG_NAME.into(),
                fqdn: CMG_HOST.into(),
                instance: n + 1,
                listen: SocketAddr::from(([127, 0, 0, 1], port(options.gateway_port))),
                tunnel_listen: SocketAddr::from(([127, 0, 0, 1], port(options.tunnel_port))),
                metrics_listen: None,
                server_cert: dev.chain.clone(),
                server_key: dev.key.clone(),
                site_root: data.pki_dir().join("site-root.crt"),
                log_dir: data
                    .root()
                    .join("cmg")
                    .join(CMG_NAME)
                    .join(format!("logs-{}", n + 1)),
                stats_interval_secs: cmg_gateway::DEFAULT_STATS_INTERVAL_SECS,
                crl_files: Vec::new(),
                crl_refresh_secs: cmg_gateway::DEFAULT_CRL_REFRESH_SECS,
                device_http2: false,
            };
            gateways.push(Gateway::start(config).await?);
        }
        let device_port = gateways
            .first()
            .map_or(options.gateway_port, |g| g.device_addr().port());
        let definition = CmgDefinition {
            name: CMG_NAME.into(),
            fqdn: CMG_HOST.into(),
            instances: options.instances,
            tunnel_host: "127.0.0.1".into(),
            server_chain_pem: read(&dev.chain)?,
            trusted_cas: Vec::new(),
            crl_check: true,
            min_tls: "1.2".into(),
            data_alert_gb: 10_000,
            stop_at_critical: false,
            device_port,
        };
        if admin.cmg(CMG_NAME).await.is_ok() {
            admin
                .modify_cmg(CMG_NAME, |d| *d = definition.clone())
                .await?;
        } else {
            admin.create_cmg(&definition, &read(&dev.key)?).await?;
        }
        // The connection point must start from the MP URL and CMG just stored.
        if !site.settled(std::time::Duration::from_secs(10)).await? {
            return Err(UpError::Stale);
        }
        let targets = gateways
            .iter()
            .map(|g| TunnelTarget {
                addr: g.tunnel_addr(),
                server_name: CMG_HOST.into(),
            })
            .collect();
        let mut connector_options = ConnectorOptions::new(CMG_NAME, targets, vec![read(&dev.ca)?]);
        // All roles share this process: relayed requests reach the MP without a TLS hop.
        connector_options.in_process = vec![site.in_process_mp()?];
        let connector = Connector::start(
            Arc::clone(site.site()),
            site.state().clone(),
            connector_options,
        )
        .await?;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while !gateways
            .iter()
            .all(|g| g.tunnels() > 0 && g.settings_version().is_some())
        {
            if tokio::time::Instant::now() > deadline {
                return Err(UpError::TunnelsDown);
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let record = site.site().record();
        let up = Up {
            site_code: record.site_code.clone(),
            hierarchy_id: record.hierarchy_id.to_string().to_uppercase(),
            cmg_mp_url: format!(
                "https://{CMG_HOST}:{device_port}/CCM_Proxy_MutualAuth/{}",
                site.mp_role_id()
            ),
            dev_ca: dev.ca,
            site,
            gateways,
            connector,
        };
        admin.site().close().await;
        Ok(up)
    }

    /// A fresh bulk registration token (3 days), recorded like any other.
    pub async fn bulk_token(&self, actor: &str) -> Result<NewBulkToken, UpError> {
        let admin = AdminService::open(self.site.site().data().clone(), actor).await?;
        let token = admin.new_bulk_token(BulkTokenLifetime::DEFAULT).await;
        admin.site().close().await;
        Ok(token?)
    }

    /// The ccmsetup-style command that installs a client through this machine's gateway.
    pub fn install_command(&self, token: &NewBulkToken, state_dir: &str) -> String {
        let host_path = self.cmg_mp_url.trim_start_matches("https://");
        format!(
            "cmg client install /mp:{} CCMHOSTNAME={host_path} SMSSiteCode={} CCMALWAYSINF=1 /regtoken:{} --trust-ca {} --state-dir {state_dir}",
            self.cmg_mp_url,
            self.site_code,
            token.token.expose(),
            self.dev_ca.display()
        )
    }

    /// Stops the connection point, the gateways, then the site.
    pub async fn shutdown(self) {
        self.connector.shutdown().await;
        for gateway in self.gateways {
            gateway.shutdown().await;
        }
        self.site.shutdown().await;
    }
}

/// The development CA and the gateway certificate it issued, kept in `<data>/dev-ca/`.
struct DevPki {
    ca: PathBuf,
    chain: PathBuf,
    key: PathBuf,
}

impl DevPki {
    fn load_or_create(data: &DataDir) -> Result<DevPki, UpError> {
        let dir = data.root().join("dev-ca");
        let pki = DevPki {
            ca: dir.join("ca.crt"),
            chain: dir.join("gateway.crt"),
            key: dir.join("gateway.key"),
        };
        if pki.ca.exists() && pki.chain.exists() && pki.key.exists() {
            return Ok(pki);
        }
        std::fs::create_dir_all(&dir).map_err(|source| UpError::Io {
            action: "create",
            path: dir.clone(),
            source,
        })?;
        let ca = SiteAuthority::generate("DEV")?;
        let server = ca.issue(
            "DEV",
            &Role::ManagementPoint {
                hostnames: vec![CMG_HOST.into(), "127.0.0.1".into()],
            },
            KeyAlgorithm::EcdsaP256,
        )?;
        cmg_pki::write_private_file(&pki.key, server.key_pem().as_bytes())?;
        let chain = format!("{}{}", server.cert_pem(), ca.credential().cert_pem());
        write(&pki.chain, &chain)?;
        write(&pki.ca, ca.credential().cert_pem())?;
        Ok(pki)
    }
}

fn read(path: &PathBuf) -> Result<String, UpError> {
    std::fs::read_to_string(path).map_err(|source| UpError::Io {
        action: "read",
        path: path.clone(),
        source,
    })
}

fn write(path: &PathBuf, text: &str) -> Result<(), UpError> {
    std::fs::write(path, text).map_err(|source| UpError::Io {
        action: "write",
        path: path.clone(),
        source,
    })
}

/// The default tunnel port of instance 1.
pub const DEFAULT_TUNNEL_PORT: u16 = TUNNEL_BASE_PORT;
