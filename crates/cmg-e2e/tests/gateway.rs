//! Site + MP + connection point + two gateway instances, real TLS on loopback (DESIGN §4, §6):
//! a device on the internet registers with a bulk token, polls policy and renews through the
//! gateways; blocks reach every instance within seconds; the URL map and the tunnel's absence
//! are answered at the gateway.

use std::time::{Duration, Instant};

use cmg_store::testing::test_stores;
use cmg_testkit::TestSite;
use reqwest::StatusCode;
use serde_json::Value;

fn claims(token: &str) -> Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

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
        let row = site
            .site()
            .store()
            .device(&client_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            row.last_seen_via.as_deref(),
            Some("CMG GraniteFalls"),
            "{label}"
        );
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
            if status == StatusCode::FORBIDDEN {
                assert_eq!(body["error"], "CMGService_Token_Blocked");
                break;
            }
            assert!(
                blocked_at.elapsed() < Duration::from_secs(5),
                "instance {instance} still accepts the blocked token"
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
