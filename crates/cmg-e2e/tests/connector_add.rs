//! A connection point on another site-side host (`cmg admin connector add`, issue 4): the site
//! issues it a certificate of its own and writes a directory with none of the site's private
//! keys; a connection point opened from that directory alone — the site's data directory out of
//! reach — carries a device's registration and policy through a gateway; once removed, the
//! management point no longer believes the identities it relays, and it closes its tunnels.
//! On SQLite (with `same_host`) and on PostgreSQL when CMG_TEST_POSTGRES is set.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cmg_connector::{Connector, ConnectorError};
use cmg_site::mp::{MpOptions, MpServer};
use cmg_site::{
    AdminService, ConnectionPointName, DataDir, Site, SiteConfig, SiteError, watch_state,
};
use cmg_store::testing::test_stores;
use cmg_testkit::files::{listing, mode};
use cmg_testkit::{TestSite, claims};
use reqwest::StatusCode;
use serde_json::Value;

/// An HTTPS client that presents the credential in `dir/pki/connection-point.{crt,key}`, as a
/// connection point calls the MP.
fn as_connection_point(dir: &DataDir, root_pem: &str) -> reqwest::Client {
    let (crt, key) = dir.credential("connection-point");
    let identity = format!(
        "{}{}",
        std::fs::read_to_string(key).unwrap(),
        std::fs::read_to_string(crt).unwrap()
    );
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(root_pem.as_bytes()).unwrap()])
        .identity(reqwest::Identity::from_pem(identity.as_bytes()).unwrap())
        .build()
        .unwrap()
}

/// A registration sent straight to the MP with relay headers claiming a PKI device the gateway
/// verified; returns the client token's claims.
async fn relayed_pki_registration(
    client: &reqwest::Client,
    site: &TestSite,
    hardware_id: &str,
    claimed_thumbprint: &str,
) -> Value {
    let device = site.device(hardware_id);
    let reply = client
        .post(format!("{}/MP_ClientRegistration", site.mp_url()))
        .header("x-cmg-identity", "PKI")
        .header("x-cmg-pki-subject", "CN=laptop.contoso.com")
        .header("x-cmg-client-thumbprint", claimed_thumbprint)
        .header("x-cmg-gateway", "GraniteFalls")
        .json(&device.registration())
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::OK);
    let body: Value = reply.json().await.unwrap();
    claims(body["client_token"].as_str().unwrap())
}

/// Moves the site's data directory away (and back when dropped): what runs meanwhile cannot be
/// reading any of the site's files.
struct OutOfReach {
    data: PathBuf,
    moved: PathBuf,
}

impl OutOfReach {
    fn new(data: &Path) -> Self {
        let moved = data.with_extension("away");
        std::fs::rename(data, &moved).unwrap();
        OutOfReach {
            data: data.to_owned(),
            moved,
        }
    }
}

impl Drop for OutOfReach {
    fn drop(&mut self) {
        let _ = std::fs::rename(&self.moved, &self.data);
    }
}

#[tokio::test]
async fn a_connection_point_from_the_added_directory_relays_without_the_site_keys_until_removed() {
    for db in test_stores().await {
        let label = db.label;
        let sqlite = label == "sqlite";
        let site = TestSite::start(db).await;
        let mut cmg = site.cmg(1).await;
        // Only the new connection point below keeps tunnels to the gateway.
        cmg.stop_connector().await;
        let admin = site.admin().await;
        let parent = tempfile::tempdir().unwrap();
        let out = parent.path().join("cp2");
        let name: ConnectionPointName = "cp2.contoso.com".parse().unwrap();

        // Another host cannot share an SQLite file: refused without `same_host`, nothing made.
        if sqlite {
            let err = admin
                .add_connection_point(&name, &out, false)
                .await
                .unwrap_err();
            assert!(matches!(err, SiteError::SqliteNotShared(_)), "{err}");
            assert!(err.to_string().contains("--same-host"), "{err}");
            assert!(!out.exists());
        }
        let added = admin
            .add_connection_point(&name, &out, sqlite)
            .await
            .unwrap();
        assert_eq!(added.record.name, "cp2.contoso.com");

        // The directory: exactly these files, no private key of the site among them.
        assert_eq!(
            listing(&out),
            [
                "logs/",
                "pki/",
                "pki/connection-point.crt",
                "pki/connection-point.key",
                "pki/site-root.crt",
                "site.toml",
            ],
            "{label}"
        );
        let site_keys: Vec<String> = std::fs::read_dir(site.data.pki_dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "key"))
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect();
        assert!(site_keys.len() >= 3, "root, token signing, MP, CP keys");
        for file in listing(&out).iter().filter(|f| !f.ends_with('/')) {
            let text = std::fs::read_to_string(out.join(file)).unwrap();
            assert_eq!(
                text.contains("PRIVATE KEY"),
                file == "pki/connection-point.key",
                "{label}: {file}"
            );
            assert!(
                !site_keys.iter().any(|k| text.contains(k.trim())),
                "{label}: {file} holds a key of the site"
            );
        }
        #[cfg(unix)]
        {
            assert_eq!(mode(&out), 0o700);
            assert_eq!(mode(&out.join("pki")), 0o700);
            assert_eq!(mode(&out.join("logs")), 0o700);
            assert_eq!(mode(&out.join("pki/connection-point.key")), 0o600);
            assert_eq!(mode(&out.join("site.toml")), 0o600);
        }
        let cp_data = DataDir::new(&out);
        let cp_config = SiteConfig::load(&cp_data).unwrap();
        let site_config = SiteConfig::load(&site.data).unwrap();
        assert_eq!(cp_config.db, site_config.db, "{label}: the same database");
        assert_eq!(cp_config.hierarchy_id, site_config.hierarchy_id);
        assert_eq!(
            cp_config.connection_point.as_deref(),
            Some("cp2.contoso.com")
        );
        // The new certificate is the one the site records and its MP trusts.
        let cert_pem = std::fs::read_to_string(cp_data.credential("connection-point").0).unwrap();
        let thumbprint = cmg_pki::thumbprint_sha256(&cmg_pki::pem_to_der(&cert_pem, "cp").unwrap());
        assert_eq!(added.record.thumbprint_sha256, thumbprint);
        let state = cmg_site::SiteState::load(site.site()).await.unwrap();
        assert!(state.connection_points.contains(&thumbprint), "{label}");
        // The running MP trusts it from its next change poll on.
        site.settled().await;

        // With the site's data directory out of reach, the connection point opens from its own
        // directory: no key, so nothing that mints or serves as an MP.
        let away = OutOfReach::new(site.data.root());
        let err = Site::open(cp_data.clone()).await.unwrap_err();
        assert!(
            matches!(err, SiteError::ConnectionPointDirectory(_)),
            "{err}"
        );
        let err = AdminService::open(cp_data.clone(), "mallory")
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("cmg connector run --data"),
            "{err}"
        );
        let cp_site = Arc::new(
            Site::open_for_connection_point(cp_data.clone())
                .await
                .unwrap(),
        );
        assert!(!cp_site.has_keys());
        assert!(matches!(
            cp_site.issuer(),
            Err(SiteError::NoSiteKeys { .. })
        ));
        let (state, watcher) = watch_state(Arc::clone(&cp_site), cmg_site::CHANGE_POLL)
            .await
            .unwrap();
        let mp = MpServer::start(
            Arc::clone(&cp_site),
            state.clone(),
            MpOptions::new("127.0.0.1:0".parse().unwrap(), site.mp_role_id()),
        )
        .await;
        assert!(
            matches!(mp, Err(SiteError::NoSiteKeys { .. })),
            "{label}: an MP needs the signing key"
        );
        let options = cmg.connector_options.clone();
        let tunnels = options.tunnels_per_instance;
        let connector = Connector::start(Arc::clone(&cp_site), state.clone(), options.clone())
            .await
            .unwrap();
        let version = state.borrow().version;
        cmg.wait_until(|g| {
            g.tunnels() == tunnels && g.settings_version().is_some_and(|v| v >= version)
        })
        .await;

        // A device on the internet registers and polls policy through it.
        let bulk = admin.new_bulk_token(Default::default()).await.unwrap();
        let device = cmg.device(0, "behind-cp2");
        let (client_id, token) = device.register_ok(Some(bulk.token.expose())).await;
        assert_eq!(
            claims(&token)["RegisteredVia"],
            "BulkRegistration",
            "{label}"
        );
        assert_eq!(claims(&token)["cnf"]["x5t#S256"], device.thumbprint());
        let (status, policy) = device.policy(Some(&token)).await;
        assert_eq!(status, StatusCode::OK, "{label}: {policy}");
        assert_eq!(policy["enable_cmg"], true);
        drop(away);
        let log = std::fs::read_to_string(cp_data.logs_dir().join("SMS_Cloud_ProxyConnector.log"))
            .unwrap();
        assert!(
            log.contains("Switched to internal URL") && log.contains("MP_ClientRegistration"),
            "{label}: relayed by the new connection point: {log}"
        );
        assert!(
            site.site()
                .store()
                .device(&client_id)
                .await
                .unwrap()
                .is_some()
        );

        // The MP believes identities relayed with the new certificate…
        let relay = as_connection_point(&cp_data, site.root_pem());
        let c = relayed_pki_registration(&relay, &site, "pki-1", "claimed-thumbprint-1").await;
        assert_eq!(c["RegisteredVia"], "PKI", "{label}");
        assert_eq!(c["cnf"]["x5t#S256"], "claimed-thumbprint-1");

        // …until it is removed (any case), audited: then the relay headers are ignored and the
        // sender is an intranet device with its own certificate.
        let removed = admin
            .remove_connection_point("CP2.Contoso.COM")
            .await
            .unwrap();
        assert_eq!(removed.thumbprint_sha256, thumbprint);
        let audit = admin.audit_log(5).await.unwrap();
        assert!(
            audit
                .iter()
                .any(|e| e.action == "connection_point.remove" && e.target == "cp2.contoso.com"),
            "{label}: {audit:?}"
        );
        site.settled().await;
        let c = relayed_pki_registration(&relay, &site, "pki-2", "claimed-thumbprint-2").await;
        assert_eq!(c["RegisteredVia"], "InternalNetwork", "{label}");
        assert_eq!(c["cnf"]["x5t#S256"], thumbprint.as_str());

        // The running connection point sees it too: it closes its tunnels and says so.
        tokio::time::timeout(Duration::from_secs(10), connector.removed())
            .await
            .expect("the connection point notices its removal");
        cmg.wait_until(|g| g.tunnels() == 0).await;
        let log = std::fs::read_to_string(cp_data.logs_dir().join("SMS_Cloud_ProxyConnector.log"))
            .unwrap();
        assert!(log.contains("no longer trusts"), "{label}: {log}");
        // And it cannot be started again.
        let err = Connector::start(Arc::clone(&cp_site), state.clone(), options)
            .await
            .err()
            .expect("a removed connection point does not start");
        assert!(
            matches!(&err, ConnectorError::NotTrusted { thumbprint: t } if *t == thumbprint),
            "{err}"
        );
        assert!(err.to_string().contains("cmg admin connector add"), "{err}");

        connector.shutdown().await;
        watcher.abort();
        cp_site.close().await;
        admin.site().close().await;
        cmg.shutdown().await;
        site.shutdown().await;
    }
}
