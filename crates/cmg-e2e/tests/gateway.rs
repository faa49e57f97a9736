//! Site + MP + connection point + two gateway instances, real TLS on loopback (DESIGN §4, §6):
//! a device on the internet registers with a bulk token, polls policy and renews through the
//! gateways; blocks reach every instance within seconds; the URL map and the tunnel's absence
//! are answered at the gateway.

use std::time::{Duration, Instant};

use cmg_store::testing::test_stores;
use cmg_testkit::customer_pki::{self, serve_crl};
use cmg_testkit::{TestCmg, TestSite, claims};
use reqwest::StatusCode;
use serde_json::Value;

#[tokio::test]
async fn a_device_registers_polls_and_renews_through_both_instances() {
    for db in test_stores().await {
        let label = db.label;
        let site = TestSite::start(db).await;
        let cmg = site.cmg(2).await;
        let admin = site.admin().await;
        let bulk = admin.new_bulk_token(Default::default()).await.unwrap();

        let device = cmg.device(0, "internet-1");
        let (client_id, token) = device.register_ok(Some(bulk.token.expose())).await;
        let c = claims(&token);
        assert_eq!(c["RegisteredVia"], "BulkRegistration", "{label}");
        assert_eq!(c["cnf"]["x5t#S256"], device.thumbprint());
        let row = site
            .site()
            .store()
            .device(&client_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(row.last_seen_via.as_deref(), None);

        // The same device through the other instance: policy and renewal with its client token.
        let other_instance = cmg.device_with(1, "internet-1", device.credential.clone());
        let (status, policy) = other_instance.policy(Some(&token)).await;
        assert_eq!(status, StatusCode::OK, "{label}: {policy}");
        assert_eq!(policy["enable_cmg"], true);
        // Last-seen times are written in groups every couple of seconds.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let row = site
                .site()
                .store()
                .device(&client_id)
                .await
                .unwrap()
                .unwrap();
            if row.last_seen_via.as_deref() == Some("CMG GraniteFalls") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{label}: last seen {:?}",
                row.last_seen_via
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (status, renewed) = device.renew(Some(&token)).await;
        assert_eq!(status, StatusCode::OK, "{renewed}");
        let (status, mps) = device.location(Some(&token)).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            mps["management_points"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["kind"] == "Internet")
        );

        // The bulk token only registers.
        let (status, body) = device.policy(Some(bulk.token.expose())).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{label}: {body}");
        assert_eq!(body["error"], "CMGService_Invalid_Token");
        // The client token with another certificate.
        let thief = cmg.device(0, "internet-1");
        let (status, body) = thief.policy(Some(&token)).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("CMGService_Invalid_Token"))
        );
        // No client certificate at all.
        let bare = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(cmg.ca_pem.as_bytes()).unwrap()])
            .resolve(&cmg.fqdn, cmg.gateways[0].device_addr())
            .build()
            .unwrap();
        let reply = bare
            .get(format!("{}/SMS_MP/.sms_pol", device.base))
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), StatusCode::FORBIDDEN);
        let body: Value = reply.json().await.unwrap();
        assert_eq!(body["error"], "CMGService_Client_Certificate_Required");
        cmg.shutdown().await;
        site.shutdown().await;
    }
}

#[tokio::test]
async fn a_block_reaches_every_instance_within_five_seconds_and_unblock_restores() {
    let site = TestSite::start(cmg_store::testing::sqlite_store().await).await;
    let cmg = site.cmg(2).await;
    let admin = site.admin().await;
    let bulk = admin.new_bulk_token(Default::default()).await.unwrap();
    let guid = bulk.record.id.to_string();
    cmg.device(0, "b-1")
        .register_ok(Some(bulk.token.expose()))
        .await;

    admin.block_bulk_token(&guid).await.unwrap();
    let blocked_at = Instant::now();
    for instance in 0..2 {
        loop {
            let (status, body) = cmg
                .device(instance, &format!("b-{instance}-x"))
                .register(Some(bulk.token.expose()))
                .await;
            // The MP behind may refuse first (Token_Blocked); what counts is the gateway's own
            // refusal, before anything is relayed.
            if status == StatusCode::FORBIDDEN && body["error"] == "CMGService_Token_Blocked" {
                break;
            }
            assert!(
                status == StatusCode::OK || body["error"] == "Token_Blocked",
                "{status} {body}"
            );
            assert!(
                blocked_at.elapsed() < Duration::from_secs(5),
                "instance {instance} still relays the blocked token"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    admin.unblock_bulk_token(&guid).await.unwrap();
    let unblocked_at = Instant::now();
    for instance in 0..2 {
        loop {
            let (status, _) = cmg
                .device(instance, &format!("u-{instance}"))
                .register(Some(bulk.token.expose()))
                .await;
            if status == StatusCode::OK {
                break;
            }
            assert!(
                unblocked_at.elapsed() < Duration::from_secs(5),
                "instance {instance} still refuses"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    cmg.shutdown().await;
    site.shutdown().await;
}

#[tokio::test]
async fn urls_outside_the_map_are_refused_at_the_gateway() {
    let site = TestSite::start(cmg_store::testing::sqlite_store().await).await;
    let cmg = site.cmg(1).await;
    let admin = site.admin().await;
    let bulk = admin.new_bulk_token(Default::default()).await.unwrap();
    let device = cmg.device(0, "map-1");
    let (_, token) = device.register_ok(Some(bulk.token.expose())).await;
    let gateway = device
        .base
        .rsplit_once("/CCM_Proxy_MutualAuth/")
        .unwrap()
        .0
        .to_owned();
    for path in [
        format!(
            "/CCM_Proxy_MutualAuth/{}/SMS_MP/.sms_secret",
            cmg_role(&device.base)
        ),
        "/CCM_Proxy_MutualAuth/1/CCM_STS".to_owned(),
        "/admin".to_owned(),
    ] {
        let reply = device
            .client()
            .get(format!("{gateway}{path}"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), StatusCode::NOT_FOUND, "{path}");
        let body: Value = reply.json().await.unwrap();
        assert_eq!(body["error"], "CMGService_Url_Not_Allowed", "{path}");
    }
    let metadata = device
        .client()
        .get(format!("{gateway}/CCM_Proxy_MutualAuth/ServiceMetadata"))
        .send()
        .await
        .unwrap();
    assert_eq!(metadata.status(), StatusCode::OK);
    cmg.shutdown().await;
    site.shutdown().await;
}

fn cmg_role(base: &str) -> &str {
    base.rsplit('/').next().unwrap()
}

#[tokio::test]
async fn without_a_connection_point_the_gateway_answers_503_and_recovers_without_restart() {
    let site = TestSite::start(cmg_store::testing::sqlite_store().await).await;
    let mut cmg = site.cmg(1).await;
    let admin = site.admin().await;
    let bulk = admin.new_bulk_token(Default::default()).await.unwrap();
    let device = cmg.device(0, "down-1");
    let (_, token) = device.register_ok(Some(bulk.token.expose())).await;

    cmg.stop_connector().await;
    let reply = device
        .client()
        .get(format!("{}/SMS_MP/.sms_pol", device.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(reply.headers().get("retry-after").is_some());
    let body: Value = reply.json().await.unwrap();
    assert_eq!(body["error"], "CMGConnector_Unavailable");

    cmg.start_connector().await;
    let (status, _) = device.policy(Some(&token)).await;
    assert_eq!(status, StatusCode::OK);
    cmg.shutdown().await;
    site.shutdown().await;
}

#[tokio::test]
async fn traffic_is_reported_per_endpoint_and_cmg_changes_reach_running_gateways() {
    for db in test_stores().await {
        let label = db.label;
        let site = TestSite::start(db).await;
        let cmg = site.cmg(2).await;
        let admin = site.admin().await;
        let bulk = admin.new_bulk_token(Default::default()).await.unwrap();
        let device = cmg.device(0, "traffic-1");
        let (_, token) = device.register_ok(Some(bulk.token.expose())).await;
        for _ in 0..3 {
            assert_eq!(device.policy(Some(&token)).await.0, StatusCode::OK);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let traffic = loop {
            let (traffic, level) = admin.cmg_traffic("GraniteFalls").await.unwrap();
            if traffic
                .iter()
                .any(|t| t.endpoint == "/SMS_MP/.sms_pol" && t.requests == 3)
            {
                assert_eq!(level, cmg_site::cmg::AlertLevel::Normal);
                break traffic;
            }
            assert!(
                Instant::now() < deadline,
                "{label}: traffic not reported: {traffic:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let registration = traffic
            .iter()
            .find(|t| t.endpoint == "/MP_ClientRegistration")
            .unwrap();
        assert_eq!(registration.requests, 1, "{label}");
        assert!(registration.bytes_out > 0 && registration.bytes_in > 0);

        // A changed CMG setting reaches both running instances without a restart.
        admin
            .modify_cmg("GraniteFalls", |d| d.min_tls = "1.3".into())
            .await
            .unwrap();
        let version = site.site().store().change_version().await.unwrap();
        cmg.wait_until(|g| {
            g.settings()
                .is_some_and(|s| s.min_tls == "1.3" && s.version >= version)
        })
        .await;
        cmg.shutdown().await;
        site.shutdown().await;
    }
}

/// Four devices sending policy requests one after another through one gateway instance while
/// `cut` takes one of its two connection points away; every status they got.
async fn policy_load_across(
    cmg: &mut TestCmg,
    site: &TestSite,
    cut: impl AsyncFnOnce(&mut TestCmg),
) -> Vec<StatusCode> {
    cmg.start_connector().await;
    let admin = site.admin().await;
    let bulk = admin.new_bulk_token(Default::default()).await.unwrap();
    let mut clients = Vec::new();
    for n in 0..4 {
        let device = cmg.device(0, &format!("two-{n}"));
        let (_, token) = device.register_ok(Some(bulk.token.expose())).await;
        clients.push((device, token));
    }
    let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut loads = Vec::new();
    for (device, token) in clients {
        let running = running.clone();
        loads.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            while running.load(std::sync::atomic::Ordering::Relaxed) && statuses.len() < 2_000 {
                statuses.push(device.policy(Some(&token)).await.0);
            }
            statuses
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    cut(cmg).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    running.store(false, std::sync::atomic::Ordering::Relaxed);
    let mut statuses = Vec::new();
    for load in loads {
        statuses.extend(load.await.unwrap());
    }
    let served = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    assert!(served > 20, "{served}");
    statuses
}

#[tokio::test]
async fn with_two_connection_points_killing_one_loses_no_request_that_was_not_sent() {
    let site = TestSite::start(cmg_store::testing::sqlite_store().await).await;
    let mut cmg = site.cmg(1).await;
    let statuses =
        policy_load_across(&mut cmg, &site, async |cmg| cmg.kill_connector().await).await;
    let mut cut_in_flight = 0;
    for status in statuses {
        match status {
            StatusCode::OK => {}
            // Sent on the tunnel that went away, before its answer came back.
            StatusCode::BAD_GATEWAY => cut_in_flight += 1,
            other => panic!("a request was lost with {other}"),
        }
    }
    assert!(
        cut_in_flight <= 4,
        "only requests in flight at the cut may fail: {cut_in_flight}"
    );
    cmg.shutdown().await;
    site.shutdown().await;
}

#[tokio::test]
async fn with_two_connection_points_stopping_one_loses_no_request_at_all() {
    let site = TestSite::start(cmg_store::testing::sqlite_store().await).await;
    let mut cmg = site.cmg(1).await;
    let statuses =
        policy_load_across(&mut cmg, &site, async |cmg| cmg.stop_connector().await).await;
    let failed: Vec<_> = statuses.iter().filter(|s| **s != StatusCode::OK).collect();
    assert!(
        failed.is_empty(),
        "a stopping connection point drains its tunnels, yet {} of {} requests failed: {failed:?}",
        failed.len(),
        statuses.len()
    );
    // Both ends say what happened, and neither calls it a fault.
    let connector = connector_log(&site);
    for expected in [
        "Closing the tunnel to gateway",
        "Closed the tunnel to gateway",
    ] {
        assert!(
            connector.contains(expected),
            "no '{expected}' in:\n{connector}"
        );
    }
    let gateway = cmg.gateway_log(1, "CMGHttpHandler.log");
    let closed: Vec<_> = gateway
        .lines()
        .filter(|l| l.contains("disconnected: the connection point closed it"))
        .collect();
    assert_eq!(
        closed.len(),
        cmg.connector_options.tunnels_per_instance,
        "{gateway}"
    );
    assert!(
        closed.iter().all(|l| l.contains("type=\"1\"")),
        "{closed:?}"
    );
    assert!(!gateway.contains("close_notify"), "{gateway}");
    // Each connection point reports its traffic last after its tunnels closed: the requests
    // answered while they drained are counted too.
    cmg.shutdown().await;
    let (traffic, _) = site
        .admin()
        .await
        .cmg_traffic("GraniteFalls")
        .await
        .unwrap();
    let reported = traffic
        .iter()
        .find(|t| t.endpoint == "/SMS_MP/.sms_pol")
        .map_or(0, |t| t.requests);
    assert_eq!(reported, statuses.len() as i64, "{traffic:?}");
    site.shutdown().await;
}

/// The connection point's log lines about the gateway whose tunnel port is `addr` that contain
/// `text`, once there is one per tunnel (10 s at most).
async fn tunnel_lines(
    site: &TestSite,
    cmg: &TestCmg,
    addr: std::net::SocketAddr,
    text: &str,
) -> Vec<String> {
    let addr = addr.to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = connector_log(site);
        let lines: Vec<String> = log
            .lines()
            .filter(|l| l.contains(&addr) && l.contains(text))
            .map(str::to_owned)
            .collect();
        if lines.len() >= cmg.connector_options.tunnels_per_instance {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "no '{text}' for each tunnel to {addr}:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_gateway_that_stops_closes_its_tunnels_cleanly_and_one_that_dies_is_a_fault() {
    let site = TestSite::start(cmg_store::testing::sqlite_store().await).await;
    let mut cmg = site.cmg(3).await;

    // A gateway that dies cuts its tunnels without close_notify: a fault.
    let killed = cmg.gateways.remove(2);
    let killed_addr = killed.tunnel_addr();
    killed.abort();
    let lost = tunnel_lines(&site, &cmg, killed_addr, "closed without TLS close_notify").await;
    assert!(lost.iter().all(|l| l.contains("type=\"2\"")), "{lost:?}");

    // GOAWAY and close_notify tell the connection point the close was deliberate.
    let stopped = cmg.gateways.remove(1);
    let tunnel_addr = stopped.tunnel_addr();
    stopped.shutdown().await;
    let expected = "closed the tunnel: it is stopping or restarting";
    let closed = tunnel_lines(&site, &cmg, tunnel_addr, expected).await;
    assert!(
        closed.iter().all(|l| l.contains("type=\"1\"")),
        "{closed:?}"
    );
    let log = connector_log(&site);
    let lost: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&tunnel_addr.to_string()))
        .filter(|l| l.contains("close_notify") || l.contains("the tunnel closed"))
        .collect();
    assert!(
        lost.is_empty(),
        "a deliberate close was taken for a lost tunnel: {lost:?}"
    );
    let gateway = cmg.gateway_log(2, "CMGHttpHandler.log");
    assert!(
        gateway.contains("disconnected: the gateway is shutting down"),
        "{gateway}"
    );

    // The other instance relays as before.
    let admin = site.admin().await;
    let bulk = admin.new_bulk_token(Default::default()).await.unwrap();
    let device = cmg.device(0, "stays-1");
    let (_, token) = device.register_ok(Some(bulk.token.expose())).await;
    let (status, _) = device.policy(Some(&token)).await;
    assert_eq!(status, StatusCode::OK);
    cmg.shutdown().await;
    site.shutdown().await;
}

#[tokio::test]
async fn a_blocked_device_is_refused_by_every_instance_within_five_seconds() {
    let site = TestSite::start(cmg_store::testing::sqlite_store().await).await;
    let cmg = site.cmg(2).await;
    let admin = site.admin().await;
    let bulk = admin.new_bulk_token(Default::default()).await.unwrap();
    let device = cmg.device(0, "blocked-device");
    let (client_id, token) = device.register_ok(Some(bulk.token.expose())).await;
    let instances = [device.credential.clone(), device.credential.clone()]
        .into_iter()
        .enumerate()
        .map(|(n, credential)| cmg.device_with(n, "blocked-device", credential))
        .collect::<Vec<_>>();
    for d in &instances {
        assert_eq!(d.policy(Some(&token)).await.0, StatusCode::OK);
    }
    admin.block_device(&client_id).await.unwrap();
    let blocked_at = Instant::now();
    for (n, d) in instances.iter().enumerate() {
        loop {
            let (status, body) = d.policy(Some(&token)).await;
            if body["error"] == "CMGService_Token_Blocked" {
                assert_eq!(status, StatusCode::FORBIDDEN);
                break;
            }
            assert!(
                status == StatusCode::OK || body["error"] == "Device_Blocked",
                "{status} {body}"
            );
            assert!(
                blocked_at.elapsed() < Duration::from_secs(5),
                "instance {n} still relays the blocked device"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    cmg.shutdown().await;
    site.shutdown().await;
}

#[tokio::test]
async fn pki_devices_from_a_trusted_ca_need_no_token_and_follow_the_crl_setting() {
    use cmg_pki::{KeyAlgorithm, Role, SiteAuthority};
    let site = TestSite::start(cmg_store::testing::sqlite_store().await).await;
    let customer_ca = SiteAuthority::generate("CUS").unwrap();
    let trusted = customer_ca.credential().cert_pem().to_owned();
    let cmg = site.cmg_with(2, |d| d.trusted_cas = vec![trusted]).await;
    let laptop = customer_ca
        .issue("CUS", &Role::ConnectionPoint, KeyAlgorithm::EcdsaP256)
        .unwrap();
    let device = cmg.device_with(0, "pki-1", laptop.clone());

    // CRL check on (the default) and no CRL published: the gateway cannot vouch for it.
    let (status, body) = device.register(None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("CMGService_Revocation_Unknown")),
        "{body}"
    );

    let admin = site.admin().await;
    admin
        .modify_cmg("GraniteFalls", |d| d.crl_check = false)
        .await
        .unwrap();
    let version = site.site().store().change_version().await.unwrap();
    cmg.wait_until(|g| {
        g.settings()
            .is_some_and(|s| !s.crl_check && s.version >= version)
    })
    .await;

    let (status, body) = device.register(None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        claims(body["client_token"].as_str().unwrap())["RegisteredVia"],
        "PKI"
    );
    // Every mapped endpoint through the other instance, without any token.
    let other = cmg.device_with(1, "pki-1", laptop);
    let (status, body) = other.policy(None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = other.location(None).await;
    assert_eq!(status, StatusCode::OK);
    let batch = serde_json::json!({"messages": [{"id": "p-1", "kind": "Heartbeat", "time": 1}]});
    let reply = other
        .client()
        .post(format!("{}/ccm_system/request", other.base))
        .json(&batch)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::OK);

    // A certificate from a CA this CMG does not trust gets only the token rules.
    let stranger_ca = SiteAuthority::generate("OTH").unwrap();
    let stranger = stranger_ca
        .issue("OTH", &Role::ConnectionPoint, KeyAlgorithm::EcdsaP256)
        .unwrap();
    let (status, body) = cmg.device_with(0, "pki-2", stranger).policy(None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("CMGService_Invalid_Token"))
    );
    cmg.shutdown().await;
    site.shutdown().await;
}

#[tokio::test]
async fn at_the_critical_data_level_relaying_stops_when_so_configured() {
    let site = TestSite::start(cmg_store::testing::sqlite_store().await).await;
    let cmg = site
        .cmg_with(1, |d| {
            d.data_alert_gb = 1;
            d.stop_at_critical = true;
        })
        .await;
    let admin = site.admin().await;
    let bulk = admin.new_bulk_token(Default::default()).await.unwrap();
    let device = cmg.device(0, "alert-1");
    let (_, token) = device.register_ok(Some(bulk.token.expose())).await;
    // 0.95 GB already sent in the last 14 days, as another connection point reported.
    let now = cmg_site::unix_now();
    let row = cmg_store::TrafficRow {
        cmg: "GraniteFalls".into(),
        connector: "elsewhere".into(),
        endpoint: "/SMS_MP/.sms_pol".into(),
        period_start: now - now % 300,
        requests: 1,
        bytes_in: 1,
        bytes_out: 950_000_000,
    };
    site.site().store().record_traffic(&[row]).await.unwrap();
    let (_, level) = admin.cmg_traffic("GraniteFalls").await.unwrap();
    assert_eq!(level, cmg_site::cmg::AlertLevel::Critical);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = device.policy(Some(&token)).await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(body["error"], "CMGConnector_Stopped");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still relaying at the critical level"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Raising the threshold resumes relaying.
    admin
        .modify_cmg("GraniteFalls", |d| d.data_alert_gb = 100)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while device.policy(Some(&token)).await.0 != StatusCode::OK {
        assert!(Instant::now() < deadline, "relaying did not resume");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cmg.shutdown().await;
    site.shutdown().await;
}

/// As `cmg up` runs it: the connection point calls the MP of its own process (no TLS hop), and
/// everything a device sees is the same; the verbose log names every internal URL.
#[tokio::test]
async fn with_the_mp_in_process_the_relay_keeps_every_rule() {
    let site = TestSite::start(cmg_store::testing::sqlite_store().await).await;
    let mut cmg = site.cmg(1).await;
    cmg.connector_options.in_process = vec![site.in_process_mp()];
    cmg.start_connector().await;
    cmg.stop_connector().await;
    let admin = site.admin().await;
    let bulk = admin.new_bulk_token(Default::default()).await.unwrap();

    let device = cmg.device(0, "in-process-1");
    let (client_id, token) = device.register_ok(Some(bulk.token.expose())).await;
    assert_eq!(claims(&token)["RegisteredVia"], "BulkRegistration");
    let (status, policy) = device.policy(Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{policy}");
    // The MP believed the identity the gateway verified: the device was seen via the CMG.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let row = site.site().store().device(&client_id).await.unwrap();
        if row.and_then(|r| r.last_seen_via).as_deref() == Some("CMG GraniteFalls") {
            break;
        }
        assert!(Instant::now() < deadline, "never seen via the CMG");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, renewed) = device.renew(Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{renewed}");

    let log = connector_log(&site);
    let expected = format!(
        "Switched to internal URL {}{} (in process)",
        site.mp_url(),
        cmg_proto::mp::POLICY
    );
    assert!(log.contains(&expected), "no '{expected}' in:\n{log}");
}

#[tokio::test]
async fn a_management_point_that_cannot_be_reached_is_skipped_for_the_next_one() {
    let site = TestSite::start(cmg_store::testing::sqlite_store().await).await;
    // A second MP that accepts CMG traffic, at a loopback port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let admin = site.admin().await;
    let down = admin
        .add_management_point("MP-DOWN", &format!("https://{closed}"), true, None)
        .await
        .unwrap();
    site.settled().await;
    let cmg = site.cmg(1).await;
    let bulk = admin.new_bulk_token(Default::default()).await.unwrap();
    let device = cmg.device(0, "skip-1");
    let (_, token) = device.register_ok(Some(bulk.token.expose())).await;
    // Addressed to the MP that is down: nothing reaches it, so the reachable MP answers.
    let (proxy, _) = device.base.rsplit_once('/').unwrap();
    let url = format!("{proxy}/{}{}", down.role_id, cmg_proto::mp::POLICY);
    for _ in 0..3 {
        let response = device
            .client()
            .get(&url)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        let status = response.status();
        assert_eq!(status, StatusCode::OK, "{}", response.text().await.unwrap());
    }
    let log = connector_log(&site);
    let expected = format!(
        "Management point {} is unreachable (cannot connect to https://{closed}:",
        down.role_id
    );
    assert!(log.contains(&expected), "no '{expected}' in:\n{log}");
    cmg.shutdown().await;
    site.shutdown().await;
}

/// The site's connection point log.
fn connector_log(site: &TestSite) -> String {
    let path = site
        .site()
        .data()
        .logs_dir()
        .join("SMS_Cloud_ProxyConnector.log");
    std::fs::read_to_string(path).unwrap()
}

// ---------------------------------------------------------------------------------------------
// PKI client certificates from a customer CA, and that CA's CRL (DESIGN §4, first row).

/// `POST /ccm_system/request` with one status message, with or without a client token.
async fn post_status(
    device: &cmg_testkit::TestDevice,
    id: &str,
    token: Option<&str>,
) -> cmg_testkit::Reply {
    let batch = serde_json::json!({"messages": [{"id": id, "kind": "Heartbeat", "time": 1}]});
    let mut request = device
        .client()
        .post(format!("{}{}", device.base, cmg_proto::mp::STATUS))
        .json(&batch);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let reply = request.send().await.unwrap();
    let status = reply.status();
    (status, reply.json().await.unwrap_or(Value::Null))
}

/// The IDs of the status messages the site stored for `client_id`, in order of arrival.
async fn stored_messages(site: &TestSite, client_id: &str) -> Vec<String> {
    site.site()
        .store()
        .status_messages(client_id)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.message.message_id)
        .collect()
}

#[track_caller]
fn assert_revoked((status, body): cmg_testkit::Reply, what: &str) {
    assert_eq!(
        (status, body["error"].as_str()),
        (
            StatusCode::FORBIDDEN,
            Some("CMGService_Certificate_Revoked")
        ),
        "{what}: {body}"
    );
}

/// Issue 4: with the CMG's CRL check on, a device whose PKI certificate its CA's CRL revokes is
/// refused by both instances and never reaches the site, while another device of the same CA
/// reaches every MP endpoint through both. The CRL comes from the distribution point named in
/// the device certificates, as a CA publishes it. Turning the check off (`cmg admin cmg modify`)
/// lets the revoked device in within seconds on both instances; on again, it is out again.
#[tokio::test]
async fn a_pki_device_revoked_by_its_cas_crl_is_refused_by_both_instances_while_the_check_is_on() {
    let ca = customer_pki::ca("Contoso Issuing CA", None);
    let (_, crl_der) = customer_pki::crl(&ca, &[4002]);
    let (cdp, downloads) = serve_crl(crl_der).await;
    let good = customer_pki::device(&ca, "pki-good", 4001, Some(&cdp), &[]).credential();
    let revoked = customer_pki::device(&ca, "pki-revoked", 4002, Some(&cdp), &[]).credential();
    let revoked_thumbprint = cmg_pki::thumbprint_sha256(revoked.cert_der());

    let site = TestSite::start(cmg_store::testing::sqlite_store().await).await;
    let cmg = site
        .cmg_with(2, |d| {
            d.trusted_cas = vec![ca.pem.clone()];
            d.crl_check = true;
        })
        .await;
    let store = site.site().store();

    // The good device, without any token (but for renewal, which renews the token it got at
    // registration): every MP endpoint through each instance.
    let mut good_id = None;
    for n in 0..2 {
        let device = cmg.device_with(n, "pki-good", good.clone());
        let (client_id, token) = device.register_ok(None).await;
        assert_eq!(claims(&token)["RegisteredVia"], "PKI", "instance {n}");
        assert_eq!(good_id.get_or_insert_with(|| client_id.clone()), &client_id);
        let (status, mps) = device.location(None).await;
        assert_eq!(status, StatusCode::OK, "instance {n}: {mps}");
        assert!(
            mps["management_points"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["kind"] == "Internet"),
            "{mps}"
        );
        let (status, policy) = device.policy(None).await;
        assert_eq!(status, StatusCode::OK, "instance {n}: {policy}");
        assert_eq!(policy["enable_cmg"], true);
        let (status, renewed) = device.renew(Some(&token)).await;
        assert_eq!(status, StatusCode::OK, "instance {n}: {renewed}");
        assert_eq!(
            claims(renewed["client_token"].as_str().unwrap())["sub"],
            client_id.as_str()
        );
        let (status, ack) = post_status(&device, &format!("good-{n}"), None).await;
        assert_eq!(status, StatusCode::OK, "instance {n}: {ack}");
        assert_eq!(ack["accepted"], 1);
    }
    let good_id = good_id.unwrap();
    let row = store.device(&good_id).await.unwrap().unwrap();
    assert_eq!(row.registered_via, "PKI");
    assert_eq!(
        row.cert_thumbprint,
        cmg_pki::thumbprint_sha256(good.cert_der())
    );
    assert_eq!(stored_messages(&site, &good_id).await, ["good-0", "good-1"]);

    // The revoked device: refused by both instances on every endpoint, before anything is
    // relayed (the MP's own codes carry no `CMGService_` prefix), so the site never hears of it.
    let revoked_devices: Vec<_> = (0..2)
        .map(|n| cmg.device_with(n, "pki-revoked", revoked.clone()))
        .collect();
    for (n, device) in revoked_devices.iter().enumerate() {
        assert_revoked(
            device.register(None).await,
            &format!("registration via {n}"),
        );
        assert_revoked(device.location(None).await, &format!("location via {n}"));
        assert_revoked(device.policy(None).await, &format!("policy via {n}"));
        assert_revoked(
            post_status(device, "revoked", None).await,
            &format!("status via {n}"),
        );
    }
    assert!(
        store
            .devices_by_hardware_id("pki-revoked")
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .device_by_certificate(&revoked_thumbprint)
            .await
            .unwrap()
            .is_none()
    );
    // Each instance downloaded the CRL from the distribution point once, not per connection.
    assert_eq!(downloads.load(std::sync::atomic::Ordering::SeqCst), 2);

    // The CRL check off: within seconds both instances let the revoked device in.
    let admin = site.admin().await;
    admin
        .modify_cmg("GraniteFalls", |d| d.crl_check = false)
        .await
        .unwrap();
    let changed = Instant::now();
    let mut revoked_login = None;
    for (n, device) in revoked_devices.iter().enumerate() {
        let registered = loop {
            let (status, body) = device.register(None).await;
            if status == StatusCode::OK {
                break body;
            }
            assert_revoked((status, body), &format!("registration via {n}"));
            assert!(
                changed.elapsed() < Duration::from_secs(5),
                "instance {n} still refuses the revoked device with the CRL check off"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let token = registered["client_token"].as_str().unwrap().to_owned();
        assert_eq!(claims(&token)["RegisteredVia"], "PKI");
        let (status, policy) = device.policy(None).await;
        assert_eq!(status, StatusCode::OK, "instance {n}: {policy}");
        let (status, ack) = post_status(device, &format!("while-off-{n}"), None).await;
        assert_eq!(status, StatusCode::OK, "instance {n}: {ack}");
        let client_id = registered["client_id"].as_str().unwrap().to_owned();
        revoked_login = Some((client_id, token));
    }
    let (revoked_id, revoked_token) = revoked_login.unwrap();
    assert_eq!(
        stored_messages(&site, &revoked_id).await,
        ["while-off-0", "while-off-1"]
    );

    // On again: both instances refuse it again within seconds, even with the client token it
    // got meanwhile; the good device is still served.
    admin
        .modify_cmg("GraniteFalls", |d| d.crl_check = true)
        .await
        .unwrap();
    let changed = Instant::now();
    for (n, device) in revoked_devices.iter().enumerate() {
        loop {
            let (status, body) = device.policy(None).await;
            if body["error"] == "CMGService_Certificate_Revoked" {
                assert_eq!(status, StatusCode::FORBIDDEN);
                break;
            }
            assert_eq!(status, StatusCode::OK, "instance {n}: {body}");
            assert!(
                changed.elapsed() < Duration::from_secs(5),
                "instance {n} still relays the revoked device with the CRL check on"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_revoked(
            device.policy(Some(&revoked_token)).await,
            &format!("policy with its token via {n}"),
        );
        assert_revoked(
            device.renew(Some(&revoked_token)).await,
            &format!("renewal via {n}"),
        );
        assert_revoked(
            post_status(device, &format!("after-on-{n}"), Some(&revoked_token)).await,
            &format!("status via {n}"),
        );
        let (status, body) = cmg
            .device_with(n, "pki-good", good.clone())
            .policy(None)
            .await;
        assert_eq!(status, StatusCode::OK, "instance {n}: {body}");
    }
    assert_eq!(
        stored_messages(&site, &revoked_id).await,
        ["while-off-0", "while-off-1"]
    );
    cmg.shutdown().await;
    site.shutdown().await;
}

/// The same CRL as an admin delivers it without a distribution point: a file named in
/// `crl_files` of each instance's configuration.
#[tokio::test]
async fn a_pki_device_revoked_by_a_crl_file_on_each_instance_is_refused_by_both() {
    let ca = customer_pki::ca("Contoso Offline CA", None);
    let good = customer_pki::device(&ca, "pki-file-good", 5001, None, &[]).credential();
    let revoked = customer_pki::device(&ca, "pki-file-revoked", 5002, None, &[]).credential();
    let dir = tempfile::tempdir().unwrap();
    let crl_file = dir.path().join("contoso-offline.crl");
    std::fs::write(&crl_file, customer_pki::crl(&ca, &[5002]).0).unwrap();

    let site = TestSite::start(cmg_store::testing::sqlite_store().await).await;
    let cmg = site
        .cmg_with_gateways(
            2,
            |d| {
                d.trusted_cas = vec![ca.pem.clone()];
                d.crl_check = true;
            },
            |g| g.crl_files = vec![crl_file.clone()],
        )
        .await;
    for n in 0..2 {
        let device = cmg.device_with(n, "pki-file-good", good.clone());
        let (_, token) = device.register_ok(None).await;
        assert_eq!(claims(&token)["RegisteredVia"], "PKI", "instance {n}");
        let (status, body) = device.policy(None).await;
        assert_eq!(status, StatusCode::OK, "instance {n}: {body}");
        let device = cmg.device_with(n, "pki-file-revoked", revoked.clone());
        assert_revoked(
            device.register(None).await,
            &format!("registration via {n}"),
        );
        assert_revoked(device.policy(None).await, &format!("policy via {n}"));
    }
    let store = site.site().store();
    assert!(
        store
            .devices_by_hardware_id("pki-file-revoked")
            .await
            .unwrap()
            .is_empty()
    );
    cmg.shutdown().await;
    site.shutdown().await;
}
