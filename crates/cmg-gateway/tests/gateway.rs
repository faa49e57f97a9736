//! The gateway against a stand-in connection point: a tiny HTTP/2 server over TLS that dials the
//! tunnel port with a site-issued certificate, answers the settings long poll, and records what
//! the gateway relays.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cmg_gateway::{Gateway, GatewayConfig};
use cmg_pki::{Credential, KeyAlgorithm, Role, SiteAuthority};
use cmg_proto::RegisteredVia;
use cmg_proto::mp::{self, relay};
use cmg_proto::tunnel::{CREDENTIAL_LENGTH, GatewaySettings, SETTINGS};
use cmg_testkit::customer_pki::{self, serve_crl};
use cmg_token::{ClientTokenRequest, SigningKey, TokenIssuer, TokenVerifier};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{HeaderMap, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::watch;

const SITE: &str = "TST";
const HIERARCHY: &str = "8e1f6d8c-3a5b-4c7d-9e0f-112233445566";
const ROLE_ID: i64 = 72186325152220500;
const CMG: &str = "GraniteFalls";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

struct Site {
    root: SiteAuthority,
    issuer: TokenIssuer,
    jwks: serde_json::Value,
}

impl Site {
    fn new() -> Site {
        let root = SiteAuthority::generate(SITE).unwrap();
        let signing = root
            .issue(SITE, &Role::TokenSigning, KeyAlgorithm::EcdsaP256)
            .unwrap();
        let pkcs8 = cmg_pki::key_pem_to_pkcs8(signing.key_pem(), "key").unwrap();
        let key = SigningKey::new(signing.cert_der(), &pkcs8).unwrap();
        let jwks = TokenVerifier::new(HIERARCHY, [key.verification_key().clone()]).jwks();
        Site {
            issuer: TokenIssuer::new(key, HIERARCHY, SITE),
            root,
            jwks,
        }
    }

    fn settings(&self, version: i64) -> GatewaySettings {
        GatewaySettings {
            version,
            cmg: CMG.into(),
            hierarchy_id: HIERARCHY.into(),
            jwks: self.jwks.clone(),
            blocked_bulk_tokens: vec![],
            blocked_devices: vec![],
            url_map: mp::GATEWAY_URL_MAP.iter().map(|s| s.to_string()).collect(),
            management_points: vec![ROLE_ID],
            trusted_cas: vec![],
            crl_check: true,
            min_tls: "1.2".into(),
        }
    }

    fn client_token(
        &self,
        device: &Credential,
        client_id: &str,
        issued: i64,
        validity: i64,
    ) -> String {
        self.client_token_der(device.cert_der(), client_id, issued, validity)
    }

    fn client_token_der(&self, der: &[u8], client_id: &str, issued: i64, validity: i64) -> String {
        let thumbprint = cmg_pki::thumbprint_sha256(der);
        self.issuer
            .mint_client(&ClientTokenRequest {
                client_id,
                cert_thumbprint: &thumbprint,
                registered_via: RegisteredVia::BulkRegistration,
                bulk_token_id: None,
                token_id: "jti-1",
                now: issued,
                validity_secs: validity,
            })
            .unwrap()
            .0
            .expose()
            .to_owned()
    }

    fn bulk_token(&self, unique_id: &str) -> String {
        self.issuer
            .mint_bulk(unique_id, now() - 60, 3600)
            .unwrap()
            .0
            .expose()
            .to_owned()
    }
}

struct Harness {
    site: Site,
    gateway: Gateway,
    dir: tempfile::TempDir,
}

async fn start() -> Harness {
    start_with("", &[]).await
}

/// Starts a gateway with extra configuration lines and extra files in its directory.
async fn start_with(extra: &str, files: &[(&str, &[u8])]) -> Harness {
    let site = Site::new();
    let dir = tempfile::tempdir().unwrap();
    for (name, contents) in files {
        std::fs::write(dir.path().join(name), contents).unwrap();
    }
    let server = site
        .root
        .issue(
            SITE,
            &Role::ManagementPoint {
                hostnames: vec!["127.0.0.1".into(), "cmg.test".into()],
            },
            KeyAlgorithm::EcdsaP256,
        )
        .unwrap();
    std::fs::write(dir.path().join("cmg.crt"), server.cert_pem()).unwrap();
    std::fs::write(dir.path().join("cmg.key"), server.key_pem()).unwrap();
    std::fs::write(
        dir.path().join("site-root.crt"),
        site.root.credential().cert_pem(),
    )
    .unwrap();
    let toml = r#"
        name = "GraniteFalls"
        fqdn = "cmg.test"
        instance = 1
        listen = "127.0.0.1:0"
        tunnel_listen = "127.0.0.1:0"
        metrics_listen = "127.0.0.1:0"
        server_cert = "cmg.crt"
        server_key = "cmg.key"
        site_root = "site-root.crt"
        log_dir = "logs"
    "#;
    let toml = format!("{toml}\n{extra}\n");
    std::fs::write(dir.path().join("gateway.toml"), toml).unwrap();
    let config = GatewayConfig::load(&dir.path().join("gateway.toml")).unwrap();
    let gateway = Gateway::start(config).await.unwrap();
    Harness { site, gateway, dir }
}

/// What the stand-in connection point received.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    uri: String,
    headers: HeaderMap,
    /// The `Authorization` value the gateway sent at the front of the data (tunnel protocol).
    credential: Option<String>,
    body: Bytes,
}

struct Connector {
    settings: watch::Sender<GatewaySettings>,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Connector {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn stop(self) {
        self.task.abort();
    }
}

async fn connect(h: &Harness, cert: &Credential, settings: GatewaySettings) -> Connector {
    let root_pem = h.site.root.credential().cert_pem().to_owned();
    let config =
        cmg_pki::tls::client_config(cert.cert_pem(), cert.key_pem(), &[&root_pem], &[b"h2"])
            .unwrap();
    let tcp = tokio::net::TcpStream::connect(h.gateway.tunnel_addr())
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap();
    let (settings, _) = watch::channel(settings);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (tx, log) = (settings.clone(), Arc::clone(&seen));
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let settings = tx.subscribe();
        let log = Arc::clone(&log);
        async move { Ok::<_, std::convert::Infallible>(answer(req, settings, log).await) }
    });
    let task = tokio::spawn(async move {
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(tls), service)
            .await;
    });
    Connector {
        settings,
        seen,
        task,
    }
}

async fn answer(
    req: Request<Incoming>,
    mut settings: watch::Receiver<GatewaySettings>,
    log: Arc<Mutex<Vec<Seen>>>,
) -> Response<Full<Bytes>> {
    if req.uri().path() == SETTINGS {
        let after: Option<i64> = req
            .uri()
            .query()
            .and_then(|q| q.strip_prefix("after="))
            .and_then(|v| v.parse().ok());
        loop {
            let current = settings.borrow_and_update().clone();
            if after.is_none_or(|a| current.version > a) {
                return Response::new(Full::new(serde_json::to_vec(&current).unwrap().into()));
            }
            // A short long poll keeps the test quick.
            if tokio::time::timeout(Duration::from_secs(2), settings.changed())
                .await
                .is_err()
            {
                let mut r = Response::new(Full::new(Bytes::new()));
                *r.status_mut() = StatusCode::NO_CONTENT;
                return r;
            }
        }
    }
    let (parts, body) = req.into_parts();
    let mut body = body.collect().await.unwrap().to_bytes();
    let credential = parts.headers.get(CREDENTIAL_LENGTH).map(|length| {
        let length = length.to_str().unwrap().parse().unwrap();
        String::from_utf8(body.split_to(length).to_vec()).unwrap()
    });
    log.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        headers: parts.headers,
        credential,
        body,
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{\"relayed\":true}")))
        .unwrap()
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..200 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

fn device_client(h: &Harness, device: Option<&Credential>) -> reqwest::Client {
    let root =
        reqwest::Certificate::from_pem(h.site.root.credential().cert_pem().as_bytes()).unwrap();
    let mut builder = reqwest::Client::builder().tls_certs_only([root]);
    if let Some(device) = device {
        let identity = format!("{}{}", device.cert_pem(), device.key_pem());
        builder = builder.identity(reqwest::Identity::from_pem(identity.as_bytes()).unwrap());
    }
    builder.build().unwrap()
}

fn url(h: &Harness, endpoint: &str) -> String {
    format!(
        "https://127.0.0.1:{}/CCM_Proxy_MutualAuth/{ROLE_ID}{endpoint}",
        h.gateway.device_addr().port()
    )
}

async fn error_of(response: reqwest::Response) -> (StatusCode, String, String) {
    let status = StatusCode::from_u16(response.status().as_u16()).unwrap();
    let body: serde_json::Value = response.json().await.unwrap();
    (
        status,
        body["error"].as_str().unwrap_or_default().to_owned(),
        body["message"].as_str().unwrap_or_default().to_owned(),
    )
}

fn cp_cert(h: &Harness) -> Credential {
    h.site
        .root
        .issue(SITE, &Role::ConnectionPoint, KeyAlgorithm::EcdsaP256)
        .unwrap()
}

fn device_cert() -> Credential {
    cmg_pki::self_signed_device("device-1", KeyAlgorithm::EcdsaP256).unwrap()
}

#[tokio::test]
async fn settings_arrive_by_long_poll_and_token_devices_are_relayed_with_their_identity() {
    let h = start().await;
    let device = device_cert();
    let client = device_client(&h, Some(&device));
    let token = h.site.client_token(&device, "GUID:AAAA", now(), 86_400);

    // ServiceMetadata answers without a certificate or settings.
    let meta: serde_json::Value = device_client(&h, None)
        .get(format!(
            "https://127.0.0.1:{}/CCM_Proxy_MutualAuth/ServiceMetadata",
            h.gateway.device_addr().port()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(meta["cmg"], CMG);
    assert_eq!(meta["fqdn"], "cmg.test");
    assert_eq!(meta["instance"], 1);

    // No settings yet: 503.
    let early = client
        .post(url(&h, mp::TOKEN_RENEWAL))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(early.status().as_u16(), 503);
    assert_eq!(early.headers()["retry-after"], "30");

    let connector = connect(&h, &cp_cert(&h), h.site.settings(1)).await;
    eventually("the first settings", || {
        h.gateway.settings_version() == Some(1)
    })
    .await;
    assert_eq!(h.gateway.tunnels(), 1);

    let response = client
        .post(format!("{}?x=1&y=two", url(&h, mp::TOKEN_RENEWAL)))
        .bearer_auth(&token)
        .header("x-cmg-identity", "PKI")
        .header("x-cmg-client-thumbprint", "forged")
        .header("x-cmg-anything", "forged")
        .body("renew me")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.text().await.unwrap(), "{\"relayed\":true}");
    let seen = connector.seen();
    assert_eq!(seen.len(), 1);
    let s = &seen[0];
    assert_eq!(s.method, "POST");
    assert!(
        s.uri.ends_with(&format!(
            "/CCM_Proxy_MutualAuth/{ROLE_ID}/CCM_STS?x=1&y=two"
        )),
        "{}",
        s.uri
    );
    assert_eq!(s.body, Bytes::from_static(b"renew me"));
    assert_eq!(s.headers[relay::IDENTITY], "Token");
    assert_eq!(
        s.headers[relay::CLIENT_THUMBPRINT],
        cmg_pki::thumbprint_sha256(device.cert_der()).as_str()
    );
    assert_eq!(s.headers[relay::GATEWAY], CMG);
    assert_eq!(s.credential, Some(format!("Bearer {token}")));
    assert!(
        !s.headers.contains_key("authorization"),
        "the token travels in the data, not through HPACK"
    );
    assert!(!s.headers.contains_key("x-cmg-anything"));
    assert_eq!(s.headers.get_all(relay::IDENTITY).iter().count(), 1);

    // A GET on the same connection reuses the verified token.
    let location = client
        .get(format!("{}?MPLIST", url(&h, mp::LOCATION)))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(location.status().as_u16(), 200);
    assert!(connector.seen()[1].uri.ends_with("/SMS_MP/.sms_aut?MPLIST"));

    // A newer version wins; blocking the device takes effect at once.
    let mut next = h.site.settings(2);
    next.blocked_devices = vec!["GUID:AAAA".into()];
    connector.settings.send_replace(next);
    eventually("settings version 2", || {
        h.gateway.settings_version() == Some(2)
    })
    .await;
    let (status, code, message) = error_of(
        client
            .post(url(&h, mp::TOKEN_RENEWAL))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status.as_u16(), code.as_str()),
        (403, "CMGService_Token_Blocked")
    );
    assert!(message.contains("device_blocked"), "{message}");
    assert_eq!(
        connector.seen().len(),
        2,
        "a blocked device never reaches the site"
    );

    // The log names tunnels, versions and refusals, never the token.
    let log = std::fs::read_to_string(h.dir.path().join("logs/CMGHttpHandler.log")).unwrap();
    assert!(log.contains("Tunnel 1 connected"), "{log}");
    assert!(log.contains("Settings version 1 -> 2"), "{log}");
    // How many devices the instance can hold at once, as its open-file limit allows.
    assert!(log.contains("; open-file limit "), "{log}");
    assert!(log.contains("device_blocked"), "{log}");
    assert!(!log.contains(&token));

    // Metrics.
    let metrics = metrics(&h).await;
    assert!(
        metrics.contains("cmg_gateway_requests_total{endpoint=\"/CCM_STS\",status=\"200\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("cmg_gateway_requests_total{endpoint=\"/CCM_STS\",status=\"403\"} 1"));
    assert!(metrics.contains("cmg_gateway_tunnels 1"));
    assert!(metrics.contains("cmg_gateway_settings_version 2"));
    // The device's keep-alive connection is open; devices speak HTTP/1.1 unless HTTP/2 is on.
    assert!(
        open_device_connections(&metrics, "http/1.1") >= 1,
        "{metrics}"
    );
    assert_eq!(open_device_connections(&metrics, "h2"), 0, "{metrics}");

    connector.stop();
    h.gateway.shutdown().await;
}

#[tokio::test]
async fn a_bulk_token_only_registers() {
    let h = start().await;
    let connector = connect(&h, &cp_cert(&h), h.site.settings(1)).await;
    eventually("settings", || h.gateway.settings_version() == Some(1)).await;
    let device = device_cert();
    let client = device_client(&h, Some(&device));
    let bulk = h.site.bulk_token("db591e33-06fd-4c5b-82f3-bf673e5bd0a2");

    let registered = client
        .post(url(&h, mp::REGISTRATION))
        .bearer_auth(&bulk)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status().as_u16(), 200);
    let seen = connector.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].headers[relay::IDENTITY], "BulkRegistration");

    for endpoint in [mp::TOKEN_RENEWAL, mp::POLICY] {
        let (status, code, message) = error_of(
            client
                .post(url(&h, endpoint))
                .bearer_auth(&bulk)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(
            (status.as_u16(), code.as_str()),
            (401, "CMGService_Invalid_Token")
        );
        assert!(message.contains("bulk registration token"), "{message}");
    }
    assert_eq!(connector.seen().len(), 1);

    // No token at all: 401; a garbage token names the rule.
    let (status, code, _) =
        error_of(client.post(url(&h, mp::REGISTRATION)).send().await.unwrap()).await;
    assert_eq!(
        (status.as_u16(), code.as_str()),
        (401, "CMGService_Invalid_Token")
    );
    let (_, _, message) = error_of(
        client
            .post(url(&h, mp::REGISTRATION))
            .bearer_auth("not.a.token")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(message.contains("[rule "), "{message}");

    // An expired client token gets Token_Expired.
    let old = h
        .site
        .client_token(&device, "GUID:B", now() - 3 * 86_400, 86_400);
    let (status, code, _) = error_of(
        client
            .post(url(&h, mp::TOKEN_RENEWAL))
            .bearer_auth(&old)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status.as_u16(), code.as_str()),
        (401, "CMGService_Token_Expired")
    );

    // A client token stolen by another device: the binding fails.
    let other = device_cert();
    let stolen = h.site.client_token(&other, "GUID:C", now(), 86_400);
    let (status, _, message) = error_of(
        client
            .post(url(&h, mp::TOKEN_RENEWAL))
            .bearer_auth(&stolen)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status.as_u16(), 401);
    assert!(message.contains("cnf_mismatch"), "{message}");
    assert_eq!(connector.seen().len(), 1);

    connector.stop();
    h.gateway.shutdown().await;
}

#[tokio::test]
async fn urls_outside_the_map_are_404_and_never_forwarded() {
    let h = start().await;
    let connector = connect(&h, &cp_cert(&h), h.site.settings(1)).await;
    eventually("settings", || h.gateway.settings_version() == Some(1)).await;
    let device = device_cert();
    let client = device_client(&h, Some(&device));
    let token = h.site.client_token(&device, "GUID:D", now(), 86_400);
    let port = h.gateway.device_addr().port();
    for target in [
        url(&h, "/SMS_MP/.sms_secret"),
        url(&h, "/admin"),
        format!("https://127.0.0.1:{port}/CCM_Proxy_MutualAuth/999/CCM_STS"),
        format!("https://127.0.0.1:{port}/CCM_Proxy_MutualAuth/abc/CCM_STS"),
        format!("https://127.0.0.1:{port}/CCM_STS"),
        format!("https://127.0.0.1:{port}/_cmg/settings"),
    ] {
        let (status, code, _) = error_of(
            client
                .get(&target)
                .bearer_auth(&token)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(
            (status.as_u16(), code.as_str()),
            (404, "CMGService_Url_Not_Allowed"),
            "{target}"
        );
    }
    // ServerAuth is the same route.
    let server_auth =
        format!("https://127.0.0.1:{port}/CCM_Proxy_ServerAuth/{ROLE_ID}/SMS_MP/.sms_pol");
    let ok = client
        .get(server_auth)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    assert_eq!(connector.seen().len(), 1);

    connector.stop();
    h.gateway.shutdown().await;
}

#[tokio::test]
async fn without_a_client_certificate_devices_get_403() {
    let h = start().await;
    let connector = connect(&h, &cp_cert(&h), h.site.settings(1)).await;
    eventually("settings", || h.gateway.settings_version() == Some(1)).await;
    let bulk = h.site.bulk_token("11111111-06fd-4c5b-82f3-bf673e5bd0a2");
    let (status, code, _) = error_of(
        device_client(&h, None)
            .post(url(&h, mp::REGISTRATION))
            .bearer_auth(&bulk)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status.as_u16(), code.as_str()),
        (403, "CMGService_Client_Certificate_Required")
    );
    assert!(connector.seen().is_empty());
    connector.stop();
    h.gateway.shutdown().await;
}

#[tokio::test]
async fn without_a_tunnel_devices_get_503_with_retry_after_and_tunnels_round_robin() {
    let h = start().await;
    let first = connect(&h, &cp_cert(&h), h.site.settings(1)).await;
    let second = connect(&h, &cp_cert(&h), h.site.settings(1)).await;
    eventually("two tunnels", || h.gateway.tunnels() == 2).await;
    eventually("settings", || h.gateway.settings_version() == Some(1)).await;
    let device = device_cert();
    let client = device_client(&h, Some(&device));
    let token = h.site.client_token(&device, "GUID:E", now(), 86_400);
    for _ in 0..4 {
        let r = client
            .get(url(&h, mp::POLICY))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
    }
    assert_eq!((first.seen().len(), second.seen().len()), (2, 2));

    first.stop();
    eventually("one tunnel", || h.gateway.tunnels() == 1).await;
    // The log gives the cause: this connection point went without closing TLS.
    let log = std::fs::read_to_string(h.dir.path().join("logs/CMGHttpHandler.log")).unwrap();
    let gone = log
        .lines()
        .find(|l| l.contains("disconnected:"))
        .expect("a disconnected line");
    assert!(
        gone.contains("disconnected: peer closed connection without sending TLS close_notify"),
        "{gone}"
    );
    for _ in 0..3 {
        let r = client
            .get(url(&h, mp::POLICY))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status().as_u16(),
            200,
            "the surviving tunnel carries everything"
        );
    }
    assert_eq!(second.seen().len(), 5);

    second.stop();
    eventually("no tunnel", || h.gateway.tunnels() == 0).await;
    let r = client
        .get(url(&h, mp::POLICY))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["retry-after"], "30");
    let (status, code, _) = error_of(r).await;
    assert_eq!(
        (status.as_u16(), code.as_str()),
        (503, "CMGConnector_Unavailable")
    );
    h.gateway.shutdown().await;
}

#[tokio::test]
async fn only_site_issued_certificates_open_a_tunnel() {
    let h = start().await;
    // A certificate from another site's root is refused in the handshake.
    let stranger = SiteAuthority::generate("OTH")
        .unwrap()
        .issue("OTH", &Role::ConnectionPoint, KeyAlgorithm::EcdsaP256)
        .unwrap();
    let root_pem = h.site.root.credential().cert_pem().to_owned();
    let config = cmg_pki::tls::client_config(
        stranger.cert_pem(),
        stranger.key_pem(),
        &[&root_pem],
        &[b"h2"],
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(h.gateway.tunnel_addr())
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let result = async {
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await?;
        // TLS 1.3: the server's verdict on the client certificate arrives after the handshake.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        let mut buf = [0u8; 16];
        let n = tls.read(&mut buf).await?;
        Ok::<usize, std::io::Error>(n)
    }
    .await;
    assert!(matches!(result, Err(_) | Ok(0)), "{result:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(h.gateway.tunnels(), 0);
    let log = std::fs::read_to_string(h.dir.path().join("logs/CMGHttpHandler.log")).unwrap();
    assert!(log.contains("Refused a tunnel"), "{log}");
    h.gateway.shutdown().await;
}

#[tokio::test]
async fn bodies_over_256_kib_get_413_and_shutdown_closes_live_tunnels() {
    let h = start().await;
    let connector = connect(&h, &cp_cert(&h), h.site.settings(1)).await;
    eventually("settings", || h.gateway.settings_version() == Some(1)).await;
    let device = device_cert();
    let client = device_client(&h, Some(&device));
    let token = h.site.client_token(&device, "GUID:F", now(), 86_400);
    let big = vec![b'x'; cmg_gateway::MAX_BODY_BYTES + 1];
    let (status, code, _) = error_of(
        client
            .post(url(&h, mp::STATUS))
            .bearer_auth(&token)
            .body(big)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status.as_u16(), code.as_str()),
        (413, "CMGService_Request_Too_Large")
    );
    let fits = vec![b'x'; cmg_gateway::MAX_BODY_BYTES];
    let ok = client
        .post(url(&h, mp::STATUS))
        .bearer_auth(&token)
        .body(fits)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    let seen = connector.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body.len(), cmg_gateway::MAX_BODY_BYTES);

    // Shutdown does not wait for the connection point to hang up.
    tokio::time::timeout(Duration::from_secs(10), h.gateway.shutdown())
        .await
        .expect("shutdown finishes with a tunnel still connected");
    connector.stop();
}

#[tokio::test]
async fn the_minimum_tls_version_follows_the_settings() {
    let h = start().await;
    let mut settings = h.site.settings(1);
    settings.min_tls = "1.3".into();
    let connector = connect(&h, &cp_cert(&h), settings).await;
    eventually("settings", || h.gateway.settings_version() == Some(1)).await;
    let root =
        reqwest::Certificate::from_pem(h.site.root.credential().cert_pem().as_bytes()).unwrap();
    let tls12 = reqwest::Client::builder()
        .tls_certs_only([root])
        .tls_version_max(reqwest::tls::Version::TLS_1_2)
        .build()
        .unwrap();
    let meta = format!(
        "https://127.0.0.1:{}/CCM_Proxy_MutualAuth/ServiceMetadata",
        h.gateway.device_addr().port()
    );
    assert!(tls12.get(&meta).send().await.is_err(), "TLS 1.2 is refused");
    let ok = device_client(&h, None).get(&meta).send().await.unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    connector.stop();
    h.gateway.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// PKI client certificates (DESIGN §4, first row) and CRLs.

fn pki_client(h: &Harness, device: &customer_pki::Device) -> reqwest::Client {
    let root =
        reqwest::Certificate::from_pem(h.site.root.credential().cert_pem().as_bytes()).unwrap();
    reqwest::Client::builder()
        .tls_certs_only([root])
        .identity(reqwest::Identity::from_pem(device.identity_pem.as_bytes()).unwrap())
        .build()
        .unwrap()
}

#[tokio::test]
async fn pki_devices_need_no_token_and_revoked_or_untrusted_ones_do_not_get_in() {
    let root = customer_pki::ca("Contoso Root CA", None);
    let issuing = customer_pki::ca("Contoso Issuing CA", Some(&root));
    let good = customer_pki::device(&issuing, "pki-device-1", 1001, None, &[&issuing]);
    let revoked = customer_pki::device(&issuing, "pki-device-2", 1002, None, &[&issuing]);
    let stranger_ca = customer_pki::ca("Fabrikam Root CA", None);
    let stranger = customer_pki::device(&stranger_ca, "stranger", 7, None, &[]);
    let (crl_pem, _) = customer_pki::crl(&issuing, &[revoked.serial]);

    let h = start_with(
        "crl_files = [\"issuing.crl\"]",
        &[("issuing.crl", crl_pem.as_bytes())],
    )
    .await;
    let mut settings = h.site.settings(1);
    // Only the root is trusted: the devices send the issuing CA in their TLS chain.
    settings.trusted_cas = vec![root.pem.clone()];
    settings.crl_check = true;
    let connector = connect(&h, &cp_cert(&h), settings.clone()).await;
    eventually("settings", || h.gateway.settings_version() == Some(1)).await;

    // A trusted, unrevoked device: no token, every mapped endpoint, registration included.
    let client = pki_client(&h, &good);
    for endpoint in [mp::POLICY, mp::REGISTRATION] {
        let r = client.post(url(&h, endpoint)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{endpoint}");
    }
    let seen = connector.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(s.headers[relay::IDENTITY], "PKI");
        let subject = s.headers[relay::PKI_SUBJECT].to_str().unwrap();
        assert!(subject.contains("CN=pki-device-1"), "{subject}");
        assert_eq!(
            s.headers[relay::CLIENT_THUMBPRINT],
            cmg_pki::thumbprint_sha256(&good.der).as_str()
        );
        assert_eq!(s.credential, None);
        assert!(!s.headers.contains_key("authorization"));
    }
    // A token sent as well is forwarded for the MP, but the identity is the certificate's.
    let r = client
        .post(url(&h, mp::TOKEN_RENEWAL))
        .bearer_auth("not.a.token")
        .header("x-cmg-pki-subject", "CN=forged")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let s = &connector.seen()[2];
    assert_eq!(s.headers[relay::IDENTITY], "PKI");
    assert_eq!(s.credential.as_deref(), Some("Bearer not.a.token"));
    assert!(!s.headers.contains_key("authorization"));
    assert_eq!(s.headers.get_all(relay::PKI_SUBJECT).iter().count(), 1);
    assert!(
        s.headers[relay::PKI_SUBJECT]
            .to_str()
            .unwrap()
            .contains("pki-device-1")
    );

    // Revoked by the CRL file: 403, even with a valid client token bound to it.
    let revoked_client = pki_client(&h, &revoked);
    let token = h
        .site
        .client_token_der(&revoked.der, "GUID:REVOKED", now(), 86_400);
    for auth in [None, Some(&token)] {
        let mut request = revoked_client.post(url(&h, mp::POLICY));
        if let Some(token) = auth {
            request = request.bearer_auth(token);
        }
        let (status, code, message) = error_of(request.send().await.unwrap()).await;
        assert_eq!(
            (status.as_u16(), code.as_str()),
            (403, "CMGService_Certificate_Revoked"),
            "{message}"
        );
    }

    // From an untrusted CA: the token rules, exactly as for a self-signed certificate.
    let stranger_client = pki_client(&h, &stranger);
    let (status, code, _) = error_of(
        stranger_client
            .post(url(&h, mp::POLICY))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status.as_u16(), code.as_str()),
        (401, "CMGService_Invalid_Token")
    );
    let token = h
        .site
        .client_token_der(&stranger.der, "GUID:STRANGER", now(), 86_400);
    let r = stranger_client
        .post(url(&h, mp::POLICY))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let s = connector.seen().last().unwrap().clone();
    assert_eq!(s.headers[relay::IDENTITY], "Token");
    assert!(!s.headers.contains_key(relay::PKI_SUBJECT));
    // Self-signed token devices still get in.
    let device = device_cert();
    let token = h.site.client_token(&device, "GUID:SELF", now(), 86_400);
    let r = device_client(&h, Some(&device))
        .post(url(&h, mp::POLICY))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let relayed = connector.seen().len();

    // With the CRL check off, the revoked certificate is accepted (same connection: the
    // verdict is cached per settings version).
    settings.version = 2;
    settings.crl_check = false;
    connector.settings.send_replace(settings);
    eventually("settings 2", || h.gateway.settings_version() == Some(2)).await;
    let r = revoked_client
        .post(url(&h, mp::POLICY))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let s = connector.seen().last().unwrap().clone();
    assert_eq!(connector.seen().len(), relayed + 1);
    assert_eq!(s.headers[relay::IDENTITY], "PKI");
    assert!(
        s.headers[relay::PKI_SUBJECT]
            .to_str()
            .unwrap()
            .contains("pki-device-2")
    );

    let log = std::fs::read_to_string(h.dir.path().join("logs/CMGHttpHandler.log")).unwrap();
    assert!(log.contains("CRL file"), "{log}");
    assert!(log.contains("1 revoked certificate(s)"), "{log}");
    assert!(log.contains("certificate_revoked"), "{log}");
    assert!(log.contains("CRL check on"), "{log}");
    connector.stop();
    h.gateway.shutdown().await;
}

#[tokio::test]
async fn without_a_crl_a_pki_device_gets_revocation_unknown_when_the_check_is_on() {
    let root = customer_pki::ca("Contoso Root CA", None);
    let device = customer_pki::device(&root, "pki-device-3", 3003, None, &[]);
    let h = start().await;
    let mut settings = h.site.settings(1);
    settings.trusted_cas = vec![root.pem.clone()];
    settings.crl_check = true;
    let connector = connect(&h, &cp_cert(&h), settings).await;
    eventually("settings", || h.gateway.settings_version() == Some(1)).await;
    let (status, code, message) = error_of(
        pki_client(&h, &device)
            .post(url(&h, mp::POLICY))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status.as_u16(), code.as_str()),
        (403, "CMGService_Revocation_Unknown"),
        "{message}"
    );
    assert!(connector.seen().is_empty());
    let log = std::fs::read_to_string(h.dir.path().join("logs/CMGHttpHandler.log")).unwrap();
    assert!(log.contains("revocation_unknown"), "{log}");
    connector.stop();
    h.gateway.shutdown().await;
}

#[tokio::test]
async fn the_crl_at_a_device_certificates_distribution_point_is_fetched_and_applied() {
    let root = customer_pki::ca("Contoso Root CA", None);
    let issuing = customer_pki::ca("Contoso Issuing CA", Some(&root));
    // The CRL names the serial of the second device; the server is up before the devices.
    let (_, crl_der) = customer_pki::crl(&issuing, &[2002]);
    let (cdp, hits) = serve_crl(crl_der).await;
    // Both CAs are trusted; the devices send only their own certificate.
    let good = customer_pki::device(&issuing, "pki-device-4", 2001, Some(&cdp), &[]);
    let revoked = customer_pki::device(&issuing, "pki-device-5", 2002, Some(&cdp), &[]);

    let h = start().await;
    let mut settings = h.site.settings(1);
    settings.trusted_cas = vec![format!("{}{}", root.pem, issuing.pem)];
    settings.crl_check = true;
    let connector = connect(&h, &cp_cert(&h), settings).await;
    eventually("settings", || h.gateway.settings_version() == Some(1)).await;

    let r = pki_client(&h, &good)
        .post(url(&h, mp::POLICY))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(connector.seen()[0].headers[relay::IDENTITY], "PKI");
    let (status, code, message) = error_of(
        pki_client(&h, &revoked)
            .post(url(&h, mp::POLICY))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status.as_u16(), code.as_str()),
        (403, "CMGService_Certificate_Revoked"),
        "{message}"
    );
    assert_eq!(connector.seen().len(), 1);
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the CRL is downloaded once, not per connection"
    );
    let log = std::fs::read_to_string(h.dir.path().join("logs/CMGHttpHandler.log")).unwrap();
    assert!(log.contains(&format!("CRL fetched from {cdp}")), "{log}");
    connector.stop();
    h.gateway.shutdown().await;
}

/// The gateway's Prometheus text.
async fn metrics(h: &Harness) -> String {
    reqwest::get(format!(
        "http://{}/metrics",
        h.gateway.metrics_addr().unwrap()
    ))
    .await
    .unwrap()
    .text()
    .await
    .unwrap()
}

/// Open device connections of a protocol, as the metrics say.
fn open_device_connections(metrics: &str, protocol: &str) -> u64 {
    let prefix = format!("cmg_gateway_device_connections{{protocol=\"{protocol}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&prefix)?.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix}in {metrics}"))
}

#[tokio::test]
async fn an_idle_http2_device_connection_is_closed_like_an_http1_one() {
    let h = start_with("device_http2 = true", &[]).await;
    let device = device_cert();
    let client = device_client(&h, Some(&device));
    let metadata = format!(
        "https://127.0.0.1:{}/CCM_Proxy_MutualAuth/ServiceMetadata",
        h.gateway.device_addr().port()
    );
    let reply = client.get(&metadata).send().await.unwrap();
    assert_eq!(reply.version(), reqwest::Version::HTTP_2);
    reply.bytes().await.unwrap();
    // Kept while requests come...
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(4)).await;
        client.get(&metadata).send().await.unwrap();
        assert_eq!(open_device_connections(&metrics(&h).await, "h2"), 1);
    }
    // ...closed after 10 s without one (the client keeps its side open as long as it likes).
    let quiet = std::time::Instant::now();
    while open_device_connections(&metrics(&h).await, "h2") > 0 {
        assert!(
            quiet.elapsed() < Duration::from_secs(13),
            "an idle HTTP/2 connection stayed open"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        quiet.elapsed() >= Duration::from_secs(9),
        "{:?}",
        quiet.elapsed()
    );
    // The device simply reconnects.
    let reply = client.get(&metadata).send().await.unwrap();
    assert!(reply.status().is_success());
    h.gateway.shutdown().await;
}
