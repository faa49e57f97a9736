//! In-process harness for tests and benchmarks: a site with its management point on
//! `127.0.0.1:0` over a fresh database, and devices with their own self-signed certificates
//! talking to it over real TLS.
//!
//! Set-up failures panic: this crate is for tests. It must not be a dependency of any role.

pub mod customer_pki;
pub mod files;

use std::sync::Arc;
use std::time::Duration;

use cmg_pki::{Credential, KeyAlgorithm};
use cmg_proto::mp::{self, RegistrationRequest};
use cmg_site::mp::MpOptions;
use cmg_site::{AdminService, DataDir, InitOptions, Site, SiteRunOptions, SiteServer, init_site};
use cmg_store::testing::TestStore;
use reqwest::StatusCode;
use serde_json::Value;

/// A site on a fresh database with its management point listening on loopback.
pub struct TestSite {
    pub data: DataDir,
    pub db: TestStore,
    server: Option<SiteServer>,
    root_pem: String,
    _dir: tempfile::TempDir,
}

impl TestSite {
    /// Creates a site on `db` and starts its MP.
    pub async fn start(db: TestStore) -> TestSite {
        Self::start_with(db, |_| {}).await
    }

    /// As [`TestSite::start`], letting the test adjust the MP's options (time-outs).
    pub async fn start_with(db: TestStore, adjust: impl FnOnce(&mut MpOptions)) -> TestSite {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = DataDir::new(dir.path().join("site"));
        init_site(InitOptions {
            data: data.clone(),
            site_code: "TST".parse().expect("site code"),
            token_key: KeyAlgorithm::EcdsaP256,
            db: Some(db.url().to_owned()),
            actor: "testkit".into(),
        })
        .await
        .expect("site init");
        let mut options = SiteRunOptions::new("127.0.0.1:0".parse().expect("addr"));
        adjust(&mut options.mp);
        let server = SiteServer::start(data.clone(), options)
            .await
            .expect("site server");
        // The MP record names the address it really listens on, for MPLIST and connection points.
        let admin = AdminService::open(data.clone(), "testkit")
            .await
            .expect("admin service");
        let url = format!("https://{}", server.mp_addr());
        admin
            .set_management_point(server.mp_role_id(), Some(&url), None)
            .await
            .expect("MP URL");
        admin.site().close().await;
        let root_pem = std::fs::read_to_string(data.pki_dir().join("site-root.crt")).expect("root");
        TestSite {
            data,
            db,
            server: Some(server),
            root_pem,
            _dir: dir,
        }
    }

    fn server(&self) -> &SiteServer {
        self.server.as_ref().expect("the site server is running")
    }

    /// The MP for a connection point in this process (no TLS hop), as `cmg up` runs it.
    pub fn in_process_mp(&self) -> cmg_site::mp::InProcessMp {
        self.server()
            .in_process_mp()
            .expect("the connection point certificate")
    }

    /// `https://127.0.0.1:PORT`, the MP's base URL.
    pub fn mp_url(&self) -> String {
        format!("https://{}", self.server().mp_addr())
    }

    pub fn mp_role_id(&self) -> i64 {
        self.server().mp_role_id()
    }

    pub fn site(&self) -> &Arc<Site> {
        self.server().site()
    }

    /// The site issuing root (PEM), which devices trust for the MP's certificate.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// The admin service, as the CLI would open it: a separate handle on the same site.
    pub async fn admin(&self) -> AdminService {
        AdminService::open(self.data.clone(), "test-admin")
            .await
            .expect("admin service")
    }

    /// Waits until the running site has loaded every change made so far (it polls each second).
    pub async fn settled(&self) {
        let settled = self
            .server()
            .settled(Duration::from_secs(5))
            .await
            .expect("change version");
        assert!(settled, "the running site picks up changes within 5 s");
    }

    /// A device with a new self-signed certificate and this hardware ID.
    pub fn device(&self, hardware_id: &str) -> TestDevice {
        TestDevice::new(&self.root_pem, &self.mp_url(), hardware_id)
    }

    pub async fn shutdown(mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
    }
}

/// A device: its certificate, its hardware ID and an HTTPS client presenting that certificate.
pub struct TestDevice {
    pub credential: Credential,
    pub hardware_id: String,
    pub base: String,
    client: reqwest::Client,
    /// How `client` was built, for [`TestDevice::speaking_http1`].
    root_pem: String,
    resolve: Option<(String, std::net::SocketAddr)>,
}

/// An answer: the status and the JSON body (`Value::Null` when the body was not JSON).
pub type Reply = (StatusCode, Value);

impl TestDevice {
    pub fn new(root_pem: &str, base: &str, hardware_id: &str) -> TestDevice {
        let credential =
            cmg_pki::self_signed_device(&format!("device-{hardware_id}"), KeyAlgorithm::EcdsaP256)
                .expect("device certificate");
        Self::with_credential(root_pem, base, hardware_id, credential)
    }

    pub fn with_credential(
        root_pem: &str,
        base: &str,
        hardware_id: &str,
        credential: Credential,
    ) -> TestDevice {
        Self::build(root_pem, base, hardware_id, credential, None)
    }

    /// A device reaching `base` at `addr` whatever its host name resolves to (for a gateway's
    /// public name on loopback).
    pub fn resolving(
        root_pem: &str,
        base: &str,
        hardware_id: &str,
        credential: Credential,
        host: &str,
        addr: std::net::SocketAddr,
    ) -> TestDevice {
        Self::build(root_pem, base, hardware_id, credential, Some((host, addr)))
    }

    fn build(
        root_pem: &str,
        base: &str,
        hardware_id: &str,
        credential: Credential,
        resolve: Option<(&str, std::net::SocketAddr)>,
    ) -> TestDevice {
        let resolve = resolve.map(|(host, addr)| (host.to_owned(), addr));
        TestDevice {
            client: Self::https_client(root_pem, &credential, resolve.as_ref(), false),
            credential,
            hardware_id: hardware_id.to_owned(),
            base: base.to_owned(),
            root_pem: root_pem.to_owned(),
            resolve,
        }
    }

    /// An HTTPS client presenting `credential`, offering HTTP/2 and HTTP/1.1 (the server picks)
    /// or HTTP/1.1 only.
    fn https_client(
        root_pem: &str,
        credential: &Credential,
        resolve: Option<&(String, std::net::SocketAddr)>,
        http1_only: bool,
    ) -> reqwest::Client {
        let identity = format!("{}{}", credential.key_pem(), credential.cert_pem());
        let mut builder = reqwest::Client::builder();
        if let Some((host, addr)) = resolve {
            builder = builder.resolve(host, *addr);
        }
        if http1_only {
            builder = builder.http1_only();
        }
        builder
            .tls_certs_only(
                [reqwest::Certificate::from_pem(root_pem.as_bytes()).expect("root pem")],
            )
            .identity(reqwest::Identity::from_pem(identity.as_bytes()).expect("identity"))
            .timeout(Duration::from_secs(30))
            // Below the gateway's 10 s idle close of HTTP/1.1 connections, as the agent does.
            .pool_idle_timeout(Duration::from_secs(5))
            .build()
            .expect("https client")
    }

    /// Where this device connects and what it trusts: the TLS server name, the address and the
    /// root (PEM), for a load generator that drives its own connections.
    pub fn endpoint(&self) -> (String, std::net::SocketAddr, &str) {
        let (host, addr) = match &self.resolve {
            Some((host, addr)) => (host.clone(), *addr),
            None => {
                let addr: std::net::SocketAddr =
                    self.split_base().0.parse().expect(
                        "a device without a resolve override has an IP address in its base",
                    );
                (addr.ip().to_string(), addr)
            }
        };
        (host, addr, &self.root_pem)
    }

    /// The path part of the base URL (`/CCM_Proxy_MutualAuth/<MP>` through a gateway, empty on
    /// the intranet).
    pub fn base_path(&self) -> &str {
        self.split_base().1
    }

    /// The base URL's authority and path.
    fn split_base(&self) -> (&str, &str) {
        let rest = self.base.trim_start_matches("https://");
        rest.split_at(rest.find('/').unwrap_or(rest.len()))
    }

    /// The same device on HTTP/1.1 connections (as Configuration Manager clients speak), with a
    /// connection pool of its own.
    pub fn speaking_http1(&self) -> TestDevice {
        TestDevice {
            client: Self::https_client(
                &self.root_pem,
                &self.credential,
                self.resolve.as_ref(),
                true,
            ),
            credential: self.credential.clone(),
            hardware_id: self.hardware_id.clone(),
            base: self.base.clone(),
            root_pem: self.root_pem.clone(),
            resolve: self.resolve.clone(),
        }
    }

    /// Another device (hardware ID) sharing this one's certificate and connection pool: a cheap
    /// way for benchmarks to register many devices over a few keep-alive connections.
    pub fn with_hardware_id(&self, hardware_id: &str) -> TestDevice {
        TestDevice {
            credential: self.credential.clone(),
            hardware_id: hardware_id.to_owned(),
            base: self.base.clone(),
            client: self.client.clone(),
            root_pem: self.root_pem.clone(),
            resolve: self.resolve.clone(),
        }
    }

    /// The same device (hardware ID) with a new certificate, as after a reinstall.
    pub fn with_new_certificate(&self, root_pem: &str) -> TestDevice {
        TestDevice::new(root_pem, &self.base, &self.hardware_id)
    }

    pub fn thumbprint(&self) -> String {
        cmg_pki::thumbprint_sha256(self.credential.cert_der())
    }

    pub fn registration(&self) -> RegistrationRequest {
        RegistrationRequest {
            hardware_id: self.hardware_id.clone(),
            hostname: format!("host-{}", self.hardware_id),
            os: "Linux".into(),
            agent_version: "5.00.9000.1000".into(),
        }
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        Self::try_send(request)
            .await
            .expect("request reaches the MP")
    }

    async fn try_send(request: reqwest::RequestBuilder) -> reqwest::Result<Reply> {
        let response = request.send().await?;
        let status = response.status();
        let body = response.json::<Value>().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    fn with_bearer(
        request: reqwest::RequestBuilder,
        token: Option<&str>,
    ) -> reqwest::RequestBuilder {
        match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// `POST /MP_ClientRegistration`, optionally with a bulk registration token.
    pub async fn register(&self, bulk_token: Option<&str>) -> Reply {
        self.try_register(bulk_token)
            .await
            .expect("request reaches the MP")
    }

    /// As [`TestDevice::register`], but an unreachable MP is an error, not a panic.
    pub async fn try_register(&self, bulk_token: Option<&str>) -> reqwest::Result<Reply> {
        let request = self
            .client
            .post(format!("{}{}", self.base, mp::REGISTRATION))
            .json(&self.registration());
        Self::try_send(Self::with_bearer(request, bulk_token)).await
    }

    /// Registers and returns (client ID, client token); panics unless a token came back.
    pub async fn register_ok(&self, bulk_token: Option<&str>) -> (String, String) {
        let (status, body) = self.register(bulk_token).await;
        assert_eq!(status, StatusCode::OK, "registration failed: {body}");
        let id = body["client_id"].as_str().expect("client_id").to_owned();
        let token = body["client_token"]
            .as_str()
            .expect("client_token")
            .to_owned();
        (id, token)
    }

    pub async fn renew(&self, token: Option<&str>) -> Reply {
        let request = self
            .client
            .post(format!("{}{}", self.base, mp::TOKEN_RENEWAL));
        self.send(Self::with_bearer(request, token)).await
    }

    pub async fn policy(&self, token: Option<&str>) -> Reply {
        let request = self.client.get(format!("{}{}", self.base, mp::POLICY));
        self.send(Self::with_bearer(request, token)).await
    }

    pub async fn location(&self, token: Option<&str>) -> Reply {
        let request = self
            .client
            .get(format!("{}{}?MPLIST", self.base, mp::LOCATION));
        self.send(Self::with_bearer(request, token)).await
    }

    pub async fn status(&self, token: &str, batch: &Value) -> Reply {
        let request = self
            .client
            .post(format!("{}{}", self.base, mp::STATUS))
            .json(batch);
        self.send(request.bearer_auth(token)).await
    }
}

/// A CMG of a [`TestSite`]: its gateway instances on loopback, with a server certificate from a
/// development CA, and the site's connection point keeping a tunnel to each.
pub struct TestCmg {
    pub name: String,
    pub fqdn: String,
    /// The development CA that issued the gateways' server certificate (devices trust it).
    pub ca_pem: String,
    pub gateways: Vec<cmg_gateway::Gateway>,
    /// Running connection points, each with the tunnels it keeps per instance.
    connectors: Vec<(cmg_connector::Connector, usize)>,
    /// Options of the next [`TestCmg::start_connector`]; verbose (every relayed URL logged) by
    /// default, as tests read those lines.
    pub connector_options: cmg_connector::ConnectorOptions,
    mp_role_id: i64,
    site: Arc<Site>,
    state: cmg_site::StateWatch,
    dir: tempfile::TempDir,
}

impl TestSite {
    /// Defines a CMG with `instances` gateways, starts them on loopback, and starts a connection
    /// point for it; returns once every gateway has a tunnel and the site's settings.
    pub async fn cmg(&self, instances: u8) -> TestCmg {
        self.cmg_with(instances, |_| {}).await
    }

    /// As [`TestSite::cmg`], letting the test adjust the definition (trusted CAs, CRL check…).
    pub async fn cmg_with(
        &self,
        instances: u8,
        adjust: impl FnOnce(&mut cmg_site::cmg::CmgDefinition),
    ) -> TestCmg {
        self.cmg_with_gateways(instances, adjust, |_| {}).await
    }

    /// As [`TestSite::cmg_with`], also letting the test adjust each instance's configuration
    /// file before that instance starts (e.g. `crl_files`), as an admin edits `instance-N.toml`.
    pub async fn cmg_with_gateways(
        &self,
        instances: u8,
        adjust: impl FnOnce(&mut cmg_site::cmg::CmgDefinition),
        adjust_gateway: impl Fn(&mut cmg_gateway::GatewayConfig),
    ) -> TestCmg {
        let dir = tempfile::tempdir().expect("temp dir");
        let fqdn = "granitefalls.cmg.test".to_owned();
        let ca = cmg_pki::SiteAuthority::generate("DEV").expect("dev CA");
        let server = ca
            .issue(
                "DEV",
                &cmg_pki::Role::ManagementPoint {
                    hostnames: vec![fqdn.clone()],
                },
                KeyAlgorithm::EcdsaP256,
            )
            .expect("server certificate");
        let chain = format!("{}{}", server.cert_pem(), ca.credential().cert_pem());
        let mut def = cmg_site::cmg::CmgDefinition {
            name: "GraniteFalls".into(),
            fqdn: fqdn.clone(),
            instances,
            tunnel_host: "127.0.0.1".into(),
            server_chain_pem: chain.clone(),
            trusted_cas: Vec::new(),
            crl_check: true,
            min_tls: "1.2".into(),
            data_alert_gb: 10_000,
            stop_at_critical: false,
            device_port: 443,
        };
        adjust(&mut def);
        self.admin()
            .await
            .create_cmg(&def, server.key_pem())
            .await
            .expect("create CMG");
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write");
            path
        };
        let (cert, key, root) = (
            write("server.crt", &chain),
            write("server.key", server.key_pem()),
            write("site-root.crt", &self.root_pem),
        );
        let mut gateways = Vec::new();
        for instance in 1..=instances {
            let mut config = cmg_gateway::GatewayConfig {
                name: def.name.clone(),
                fqdn: fqdn.clone(),
                instance,
                listen: "127.0.0.1:0".parse().expect("addr"),
                tunnel_listen: "127.0.0.1:0".parse().expect("addr"),
                metrics_listen: Some("127.0.0.1:0".parse().expect("addr")),
                server_cert: cert.clone(),
                server_key: key.clone(),
                site_root: root.clone(),
                log_dir: dir.path().join(format!("logs-{instance}")),
                stats_interval_secs: 1,
                crl_files: Vec::new(),
                crl_refresh_secs: 3600,
                device_http2: false,
            };
            adjust_gateway(&mut config);
            gateways.push(cmg_gateway::Gateway::start(config).await.expect("gateway"));
        }
        let targets = gateways
            .iter()
            .map(|g| cmg_connector::TunnelTarget {
                addr: g.tunnel_addr(),
                server_name: fqdn.clone(),
            })
            .collect();
        let mut options = cmg_connector::ConnectorOptions::new(
            &def.name,
            targets,
            vec![ca.credential().cert_pem().to_owned()],
        );
        options.verbose = true;
        options.max_backoff = Duration::from_millis(500);
        options.report_interval = Duration::from_millis(300);
        self.settled().await;
        let mut cmg = TestCmg {
            name: def.name,
            fqdn,
            ca_pem: ca.credential().cert_pem().to_owned(),
            gateways,
            connectors: Vec::new(),
            connector_options: options,
            mp_role_id: self.mp_role_id(),
            site: Arc::clone(self.site()),
            state: self.server().state().clone(),
            dir,
        };
        cmg.start_connector().await;
        cmg
    }
}

impl TestCmg {
    /// Starts a(nother) connection point and waits until every gateway has a tunnel from each
    /// and the site's settings.
    pub async fn start_connector(&mut self) {
        let connector = cmg_connector::Connector::start(
            Arc::clone(&self.site),
            self.state.clone(),
            self.connector_options.clone(),
        )
        .await
        .expect("connection point");
        self.connectors
            .push((connector, self.connector_options.tunnels_per_instance));
        let (wanted, version) = (self.tunnels(), self.state.borrow().version);
        self.wait_until(|g| {
            g.tunnels() >= wanted && g.settings_version().is_some_and(|v| v >= version)
        })
        .await;
    }

    /// What gateway `instance` (1-based) wrote so far to its log `file` (`CMGHttpHandler.log`,
    /// `CMGService.log`).
    pub fn gateway_log(&self, instance: usize, file: &str) -> String {
        let path = self.dir.path().join(format!("logs-{instance}")).join(file);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// Tunnels each gateway instance should have from the running connection points.
    pub fn tunnels(&self) -> usize {
        self.connectors.iter().map(|(_, n)| n).sum()
    }

    /// Stops the oldest connection point gracefully (its tunnels drain and close) and waits
    /// until the gateways see it.
    pub async fn stop_connector(&mut self) {
        if !self.connectors.is_empty() {
            self.connectors.remove(0).0.shutdown().await;
        }
        let remaining = self.tunnels();
        self.wait_until(|g| g.tunnels() == remaining).await;
    }

    /// Kills the oldest connection point, as a crash would (its tunnels are cut), and waits
    /// until the gateways see it.
    pub async fn kill_connector(&mut self) {
        if !self.connectors.is_empty() {
            self.connectors.remove(0).0.abort();
        }
        let remaining = self.tunnels();
        self.wait_until(|g| g.tunnels() == remaining).await;
    }

    /// Waits (up to 10 s) until `ready` holds for every gateway instance.
    pub async fn wait_until(&self, ready: impl Fn(&cmg_gateway::Gateway) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !self.gateways.iter().all(&ready) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "gateways not ready within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A device talking to gateway instance `instance` (0-based) through the CMG's public URL.
    pub fn device(&self, instance: usize, hardware_id: &str) -> TestDevice {
        let credential =
            cmg_pki::self_signed_device(&format!("device-{hardware_id}"), KeyAlgorithm::EcdsaP256)
                .expect("device certificate");
        self.device_with(instance, hardware_id, credential)
    }

    /// The same, with a given certificate (e.g. another device's, to test token binding).
    pub fn device_with(
        &self,
        instance: usize,
        hardware_id: &str,
        credential: Credential,
    ) -> TestDevice {
        let addr = self.gateways[instance].device_addr();
        let base = format!(
            "https://{}:{}/CCM_Proxy_MutualAuth/{}",
            self.fqdn,
            addr.port(),
            self.mp_role_id
        );
        TestDevice::resolving(
            &self.ca_pem,
            &base,
            hardware_id,
            credential,
            &self.fqdn,
            addr,
        )
    }

    pub async fn shutdown(mut self) {
        for (connector, _) in self.connectors.drain(..) {
            connector.shutdown().await;
        }
        for gateway in self.gateways.drain(..) {
            gateway.shutdown().await;
        }
    }
}

/// Part `index` of a compact JWS (0 header, 1 claims) as JSON, read without verifying — for
/// tests that check what a token says.
pub fn jws_part(token: &str, index: usize) -> Value {
    use base64::Engine;
    let part = token.split('.').nth(index).expect("a JWS part");
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .expect("base64url");
    serde_json::from_slice(&json).expect("JSON")
}

/// The claims of a token (see [`jws_part`]).
pub fn claims(token: &str) -> Value {
    jws_part(token, 1)
}
