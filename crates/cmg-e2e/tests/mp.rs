//! The management point over real TLS on loopback, on SQLite and (with CMG_TEST_POSTGRES)
//! PostgreSQL: every endpoint of DESIGN §5.2 and every refusal.

use std::time::Duration;

use cmg_proto::RegisteredVia;
use cmg_store::testing::{TestStore, test_stores};
use cmg_testkit::{TestDevice, TestSite, claims};
use cmg_token::ClientTokenRequest;
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn sites() -> Vec<TestSite> {
    let mut sites = Vec::new();
    for db in test_stores().await {
        sites.push(TestSite::start(db).await);
    }
    sites
}

fn label(site: &TestSite) -> &'static str {
    site.db.label
}

#[tokio::test]
async fn intranet_registration_binds_the_token_to_the_certificate_and_keeps_the_client_id() {
    for site in sites().await {
        let device = site.device("hw-1");
        let (client_id, token) = device.register_ok(None).await;
        assert!(client_id.starts_with("GUID:"), "{}", label(&site));
        let c = claims(&token);
        assert_eq!(c["sub"], client_id.as_str());
        assert_eq!(c["cnf"]["x5t#S256"], device.thumbprint());
        assert_eq!(c["RegisteredVia"], "InternalNetwork");
        assert_eq!(
            c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(),
            90 * 86400
        );
        // The row is durable and complete before the token is returned.
        let row = site
            .site()
            .store()
            .device(&client_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(row.cert_thumbprint, device.thumbprint());
        // Same hardware, same certificate: same client ID.
        let (again, _) = device.register_ok(None).await;
        assert_eq!(again, client_id, "{}", label(&site));
        assert_eq!(site.site().store().devices().await.unwrap().len(), 1);
        let log = std::fs::read_to_string(site.data.logs_dir().join("MP_RegistrationManager.log"))
            .unwrap();
        assert!(log.contains(&format!("Successfully registered {client_id}")));
        assert!(
            !log.contains(token.rsplit('.').next().unwrap()),
            "a token in the log"
        );
        site.shutdown().await;
    }
}

#[tokio::test]
async fn bulk_token_registration_and_its_refusals() {
    for site in sites().await {
        let admin = site.admin().await;
        let bulk = admin.new_bulk_token(Default::default()).await.unwrap();
        let device = site.device("hw-bulk");
        let (client_id, token) = device.register_ok(Some(bulk.token.expose())).await;
        let c = claims(&token);
        assert_eq!(c["RegisteredVia"], "BulkRegistration");
        assert_eq!(c["BulkTokenId"], bulk.record.id.to_string());
        // A client token never registers anyone.
        let (status, body) = site.device("hw-other").register(Some(&token)).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("Wrong_Token_Type"))
        );
        // A blocked bulk token registers no one, as soon as the running site has seen the block.
        admin
            .block_bulk_token(&bulk.record.id.to_string())
            .await
            .unwrap();
        site.settled().await;
        let (status, body) = site
            .device("hw-late")
            .register(Some(bulk.token.expose()))
            .await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::FORBIDDEN, Some("Token_Blocked")),
            "{}",
            label(&site)
        );
        assert!(
            site.site()
                .store()
                .devices_by_hardware_id("hw-late")
                .await
                .unwrap()
                .is_empty()
        );
        let auth_log =
            std::fs::read_to_string(site.data.logs_dir().join("ClientAuth.log")).unwrap();
        assert!(
            auth_log.contains("rule bulk_token_blocked") && auth_log.contains("rule wrong_type")
        );
        assert!(
            site.site()
                .store()
                .device(&client_id)
                .await
                .unwrap()
                .is_some()
        );
        site.shutdown().await;
    }
}

#[tokio::test]
async fn another_certificate_creates_a_conflicting_record_by_default_and_merge_resolves_it() {
    for site in sites().await {
        let first = site.device("hw-c");
        let (old_id, _) = first.register_ok(None).await;
        let reinstalled = first.with_new_certificate(site.root_pem());
        let (new_id, new_token) = reinstalled.register_ok(None).await;
        assert_ne!(
            new_id,
            old_id,
            "{}: a new certificate never silently takes over",
            label(&site)
        );
        let admin = site.admin().await;
        let conflicts = admin.device_conflicts(false).await.unwrap();
        assert_eq!(conflicts.len(), 1);
        assert_eq!(
            (
                conflicts[0].new_client_id.as_str(),
                conflicts[0].existing_client_id.as_str()
            ),
            (new_id.as_str(), old_id.as_str())
        );
        let merged = admin.merge_conflict(&new_id).await.unwrap();
        assert_eq!(merged.client_id, old_id);
        assert_eq!(merged.cert_thumbprint, reinstalled.thumbprint());
        site.settled().await;
        // The token issued to the new record no longer works; registering again yields the old ID.
        let (status, _) = reinstalled.renew(Some(&new_token)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (id, _) = reinstalled.register_ok(None).await;
        assert_eq!(id, old_id);
        site.shutdown().await;
    }
}

#[tokio::test]
async fn take_over_setting_moves_the_client_id_and_revokes_the_old_token() {
    for site in sites().await {
        site.admin()
            .await
            .set_setting("conflicting_records", "take-over")
            .await
            .unwrap();
        site.settled().await;
        let first = site.device("hw-t");
        let (old_id, old_token) = first.register_ok(None).await;
        let reinstalled = first.with_new_certificate(site.root_pem());
        let (new_id, _) = reinstalled.register_ok(None).await;
        assert_eq!(new_id, old_id, "{}", label(&site));
        site.settled().await;
        let (status, body) = first.renew(Some(&old_token)).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("Token_Superseded"))
        );
        let audit = site.admin().await.audit_log(50).await.unwrap();
        assert!(
            audit
                .iter()
                .any(|e| e.action == "device.certificate_takeover" && e.target == old_id)
        );
        site.shutdown().await;
    }
}

#[tokio::test]
async fn manual_approval_holds_the_token_back_until_approved() {
    for site in sites().await {
        let admin = site.admin().await;
        admin.set_setting("approval", "manual").await.unwrap();
        site.settled().await;
        let device = site.device("hw-m");
        let (status, body) = device.register(None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["approval"], 0);
        assert!(
            body.get("client_token").is_none(),
            "{}: token before approval",
            label(&site)
        );
        let client_id = body["client_id"].as_str().unwrap().to_owned();
        admin.approve_device(&client_id).await.unwrap();
        let (again, token) = device.register_ok(None).await;
        assert_eq!(again, client_id);
        assert_eq!(claims(&token)["sub"], client_id.as_str());
        site.shutdown().await;
    }
}

#[tokio::test]
async fn renewal_gives_a_fresh_token_and_refuses_the_wrong_certificate_a_blocked_device_and_an_expired_token()
 {
    for site in sites().await {
        let device = site.device("hw-r");
        let (client_id, token) = device.register_ok(None).await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let (status, body) = device.renew(Some(&token)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let renewed = body["client_token"].as_str().unwrap();
        assert!(claims(renewed)["exp"].as_i64() > claims(&token)["exp"].as_i64());
        assert_eq!(claims(renewed)["cnf"], claims(&token)["cnf"]);
        let sts_log = std::fs::read_to_string(site.data.logs_dir().join("CCM_STS.log")).unwrap();
        assert!(sts_log.contains(&format!("Renewed the client token of {client_id}")));

        // Another certificate presenting this token.
        let thief = TestDevice::new(site.root_pem(), &site.mp_url(), "hw-r");
        let (status, body) = thief.renew(Some(&token)).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("Certificate_Mismatch"))
        );
        // No token at all.
        let (status, _) = device.renew(None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);

        // Expired: minted by the site's own key 91 days ago.
        let now = cmg_site::unix_now();
        let (expired, _) = site
            .site()
            .issuer()
            .expect("the site holds its token signing key")
            .mint_client(&ClientTokenRequest {
                client_id: &client_id,
                cert_thumbprint: &device.thumbprint(),
                registered_via: RegisteredVia::InternalNetwork,
                bulk_token_id: None,
                token_id: "old",
                now: now - 91 * 86400,
                validity_secs: 90 * 86400,
            })
            .unwrap();
        let (status, body) = device.renew(Some(expired.expose())).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("Token_Expired"))
        );
        assert!(
            body["action"]
                .as_str()
                .unwrap()
                .contains("management point on the internal network")
        );

        // Blocked: refused at once (after the running site's next poll).
        site.admin().await.block_device(&client_id).await.unwrap();
        site.settled().await;
        let (status, body) = device.renew(Some(renewed)).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::FORBIDDEN, Some("Device_Blocked")),
            "{}",
            label(&site)
        );
        let (status, _) = device.policy(Some(renewed)).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        site.shutdown().await;
    }
}

#[tokio::test]
async fn location_lists_intranet_and_cmg_urls_only_when_cmg_use_is_enabled() {
    for site in sites().await {
        let device = site.device("hw-l");
        let (status, body) = device.location(None).await;
        assert_eq!(status, StatusCode::OK);
        let mps = body["management_points"].as_array().unwrap();
        assert_eq!(mps.len(), 1);
        assert_eq!(mps[0]["kind"], "Intranet");
        let now = cmg_site::unix_now();
        let cmg = cmg_store::CmgRecord {
            name: "GraniteFalls".into(),
            fqdn: "granitefalls.contoso.com".into(),
            instances: 2,
            definition: "{}".into(),
            created_at: now,
            updated_at: now,
        };
        site.site().store().put_cmg(&cmg, "test").await.unwrap();
        site.settled().await;
        let (_, body) = device.location(None).await;
        let internet: Vec<&Value> = body["management_points"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["kind"] == "Internet")
            .collect();
        assert_eq!(internet.len(), 1, "{}", label(&site));
        assert_eq!(
            internet[0]["url"],
            format!(
                "https://granitefalls.contoso.com/CCM_Proxy_MutualAuth/{}",
                site.mp_role_id()
            )
        );
        // An MP that does not allow CMG traffic is not offered through the gateway.
        let admin = site.admin().await;
        admin
            .set_management_point(site.mp_role_id(), None, Some(false))
            .await
            .unwrap();
        site.settled().await;
        let (_, body) = device.location(None).await;
        assert!(
            body["management_points"]
                .as_array()
                .unwrap()
                .iter()
                .all(|m| m["kind"] == "Intranet")
        );
        admin
            .set_management_point(site.mp_role_id(), None, Some(true))
            .await
            .unwrap();
        admin.set_setting("enable_cmg", "no").await.unwrap();
        site.settled().await;
        let (_, body) = device.location(None).await;
        assert!(
            body["management_points"]
                .as_array()
                .unwrap()
                .iter()
                .all(|m| m["kind"] == "Intranet"),
            "{}",
            label(&site)
        );
        site.shutdown().await;
    }
}

#[tokio::test]
async fn policy_follows_the_settings_and_needs_a_token() {
    for site in sites().await {
        let device = site.device("hw-p");
        let (_, token) = device.register_ok(None).await;
        let (status, body) = device.policy(Some(&token)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["enable_cmg"], true);
        assert_eq!(body["policy_interval_secs"], 3600);
        assert_eq!(body["token_renewal_secs"], 30 * 86400);
        site.admin()
            .await
            .set_setting("policy_interval", "5m")
            .await
            .unwrap();
        site.settled().await;
        let (_, body) = device.policy(Some(&token)).await;
        assert_eq!(body["policy_interval_secs"], 300, "{}", label(&site));
        let (status, body) = device.policy(None).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("Invalid_Token"))
        );
        site.shutdown().await;
    }
}

#[tokio::test]
async fn status_messages_are_idempotent_by_message_id_and_update_last_seen() {
    for site in sites().await {
        let device = site.device("hw-s");
        let (client_id, token) = device.register_ok(None).await;
        let batch = json!({"messages": [
            {"id": "m-1", "kind": "Heartbeat", "time": 1, "body": {"uptime": 5}},
            {"id": "m-2", "kind": "Status", "time": 2, "body": {"text": "policy applied"}},
        ]});
        let (status, body) = device.status(&token, &batch).await;
        assert_eq!(
            (status, body.clone()),
            (StatusCode::OK, json!({"accepted": 2, "duplicates": 0}))
        );
        let (_, body) = device.status(&token, &batch).await;
        assert_eq!(
            body,
            json!({"accepted": 0, "duplicates": 2}),
            "{}",
            label(&site)
        );
        let stored = site
            .site()
            .store()
            .status_messages(&client_id)
            .await
            .unwrap();
        assert_eq!(stored.len(), 2);
        let row = site
            .site()
            .store()
            .device(&client_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(row.last_seen_via.as_deref(), Some("Intranet"));
        site.shutdown().await;
    }
}

#[tokio::test]
async fn jwks_verifies_the_tokens_the_mp_issues() {
    for site in sites().await {
        let device = site.device("hw-j");
        let (_, token) = device.register_ok(None).await;
        let jwks: Value = device
            .client()
            .get(format!("{}/.well-known/jwks.json", site.mp_url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let kid = cmg_testkit::jws_part(&token, 0)["kid"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            jwks["keys"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k["kid"] == kid.as_str())
        );
        site.shutdown().await;
    }
}

#[tokio::test]
async fn a_device_without_certificate_gets_a_clear_403() {
    for site in sites().await {
        let client = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(site.root_pem().as_bytes()).unwrap()])
            .build()
            .unwrap();
        let reply = client
            .post(format!("{}/MP_ClientRegistration", site.mp_url()))
            .json(&site.device("x").registration())
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), StatusCode::FORBIDDEN);
        let body: Value = reply.json().await.unwrap();
        assert_eq!(body["error"], "Client_Certificate_Required");
        site.shutdown().await;
    }
}

#[tokio::test]
async fn relay_headers_from_anyone_but_a_connection_point_are_ignored() {
    for site in sites().await {
        let device = site.device("hw-forger");
        let reply = device
            .client()
            .post(format!("{}/MP_ClientRegistration", site.mp_url()))
            .header("x-cmg-identity", "PKI")
            .header("x-cmg-client-thumbprint", "someone-elses-thumbprint")
            .header("x-cmg-gateway", "evil")
            .json(&device.registration())
            .send()
            .await
            .unwrap();
        let body: Value = reply.json().await.unwrap();
        let token = body["client_token"].as_str().unwrap();
        assert_eq!(claims(token)["RegisteredVia"], "InternalNetwork");
        assert_eq!(
            claims(token)["cnf"]["x5t#S256"],
            device.thumbprint(),
            "{}",
            label(&site)
        );
        site.shutdown().await;
    }
}

#[tokio::test]
async fn relay_headers_from_the_connection_point_carry_the_gateway_identity() {
    for site in sites().await {
        let (crt, key) = site.data.credential("connection-point");
        let identity = format!(
            "{}{}",
            std::fs::read_to_string(key).unwrap(),
            std::fs::read_to_string(crt).unwrap()
        );
        let connector = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(site.root_pem().as_bytes()).unwrap()])
            .identity(reqwest::Identity::from_pem(identity.as_bytes()).unwrap())
            .build()
            .unwrap();
        let device = site.device("hw-pki");
        let reply = connector
            .post(format!("{}/MP_ClientRegistration", site.mp_url()))
            .header("x-cmg-identity", "PKI")
            .header("x-cmg-pki-subject", "CN=laptop.contoso.com")
            .header("x-cmg-client-thumbprint", device.thumbprint())
            .header("x-cmg-gateway", "GraniteFalls")
            .json(&device.registration())
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), StatusCode::OK);
        let body: Value = reply.json().await.unwrap();
        let token = body["client_token"].as_str().unwrap();
        assert_eq!(claims(token)["RegisteredVia"], "PKI", "{}", label(&site));
        assert_eq!(claims(token)["cnf"]["x5t#S256"], device.thumbprint());
        // Relayed client-token requests are verified once and remembered; a block still wins.
        let relayed_policy = || {
            connector
                .get(format!("{}/SMS_MP/.sms_pol", site.mp_url()))
                .header("x-cmg-identity", "Token")
                .header("x-cmg-client-thumbprint", device.thumbprint())
                .header("x-cmg-gateway", "GraniteFalls")
                .bearer_auth(token)
                .send()
        };
        for _ in 0..2 {
            assert_eq!(relayed_policy().await.unwrap().status(), StatusCode::OK);
        }
        let client_id = body["client_id"].as_str().unwrap();
        site.admin().await.block_device(client_id).await.unwrap();
        site.settled().await;
        assert_eq!(
            relayed_policy().await.unwrap().status(),
            StatusCode::FORBIDDEN,
            "{}",
            label(&site)
        );
        // Relayed with a bulk identity but no token: refused, nothing stored.
        let reply = connector
            .post(format!("{}/MP_ClientRegistration", site.mp_url()))
            .header("x-cmg-identity", "BulkRegistration")
            .header("x-cmg-client-thumbprint", "t2")
            .header("x-cmg-gateway", "GraniteFalls")
            .json(&site.device("hw-nobulk").registration())
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), StatusCode::UNAUTHORIZED);
        assert!(
            site.site()
                .store()
                .devices_by_hardware_id("hw-nobulk")
                .await
                .unwrap()
                .is_empty()
        );
        site.shutdown().await;
    }
}

async fn raw(
    site: &TestSite,
    device: &TestDevice,
    content_type: &str,
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let reply = device
        .client()
        .post(format!("{}/MP_ClientRegistration", site.mp_url()))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = reply.status();
    (status, reply.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_stores_nothing_and_the_server_keeps_serving() {
    for site in sites().await {
        let device = site.device("hw-bad");
        let cases: Vec<(&str, Vec<u8>, StatusCode, &str)> = vec![
            (
                "application/json",
                vec![b'{'; 300 * 1024],
                StatusCode::PAYLOAD_TOO_LARGE,
                "Payload_Too_Large",
            ),
            (
                "application/json",
                b"{not json".to_vec(),
                StatusCode::BAD_REQUEST,
                "Bad_Request",
            ),
            (
                "application/json",
                br#"{"hardware_id":"h","hostname":"n","os":"o","agent_version":"1","extra":1}"#
                    .to_vec(),
                StatusCode::BAD_REQUEST,
                "Bad_Request",
            ),
            (
                "application/json",
                br#"{"hardware_id":"","hostname":"n","os":"o","agent_version":"1"}"#.to_vec(),
                StatusCode::BAD_REQUEST,
                "Bad_Request",
            ),
            (
                "text/plain",
                br#"{"hardware_id":"h","hostname":"n","os":"o","agent_version":"1"}"#.to_vec(),
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Unsupported_Media_Type",
            ),
        ];
        for (content_type, body, status, code) in cases {
            let (got, reply) = raw(&site, &device, content_type, body).await;
            assert_eq!(
                (got, reply["error"].as_str()),
                (status, Some(code)),
                "{}",
                label(&site)
            );
            assert!(
                reply["message"].as_str().is_some_and(|m| !m.is_empty())
                    && reply["action"].as_str().is_some()
            );
        }
        let (status, body) = device
            .client()
            .get(format!("{}/nope", site.mp_url()))
            .send()
            .await
            .map(|r| (r.status(), ()))
            .unwrap();
        assert_eq!(status, StatusCode::NOT_FOUND, "{body:?}");
        assert!(
            site.site().store().devices().await.unwrap().is_empty(),
            "nothing stored"
        );
        device.register_ok(None).await;
        site.shutdown().await;
    }
}

#[tokio::test]
async fn a_slow_client_gets_408_and_others_are_served_meanwhile() {
    let db: TestStore = cmg_store::testing::sqlite_store().await;
    let site = TestSite::start_with(db, |mp| mp.request_timeout = Duration::from_secs(1)).await;
    let device = site.device("hw-slow");
    let (sender, body) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    sender
        .send(Ok(b"{\"hardware_id\":".to_vec()))
        .await
        .unwrap();
    let stream = reqwest::Body::wrap_stream(tokio_stream_from(body));
    let slow = device
        .client()
        .post(format!("{}/MP_ClientRegistration", site.mp_url()))
        .header("content-type", "application/json")
        .body(stream)
        .send();
    let other = site.device("hw-fast");
    let (slow, fast) = tokio::join!(slow, async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        other.register_ok(None).await
    });
    assert!(fast.0.starts_with("GUID:"));
    let slow = slow.unwrap();
    assert_eq!(slow.status(), StatusCode::REQUEST_TIMEOUT);
    drop(sender);
    assert_eq!(site.site().store().devices().await.unwrap().len(), 1);
    site.shutdown().await;
}

/// A body stream fed by a channel, so the test decides when (never) the rest arrives.
fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>,
) -> impl futures_core::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures_util_stream::poll_fn(move |cx| rx.poll_recv(cx))
}

mod futures_util_stream {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    pub struct PollFn<F>(F);

    pub fn poll_fn<T, F: FnMut(&mut Context<'_>) -> Poll<Option<T>>>(f: F) -> PollFn<F> {
        PollFn(f)
    }

    impl<T, F: FnMut(&mut Context<'_>) -> Poll<Option<T>> + Unpin> futures_core::Stream for PollFn<F> {
        type Item = T;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
            (self.0)(cx)
        }
    }
}

#[tokio::test]
async fn curl_registers_with_a_self_signed_certificate() {
    let db = cmg_store::testing::sqlite_store().await;
    let site = TestSite::start(db).await;
    let device = site.device("hw-curl");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, root) = (
        dir.path().join("c.pem"),
        dir.path().join("k.pem"),
        dir.path().join("root.pem"),
    );
    std::fs::write(&cert, device.credential.cert_pem()).unwrap();
    std::fs::write(&key, device.credential.key_pem()).unwrap();
    std::fs::write(&root, site.root_pem()).unwrap();
    let body = serde_json::to_string(&device.registration()).unwrap();
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(&root)
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .args(["-H", "content-type: application/json", "-d", &body])
        .arg(format!("{}/MP_ClientRegistration", site.mp_url()))
        .output()
        .await
        .expect("curl is installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    let token = reply["client_token"].as_str().unwrap();
    assert_eq!(claims(token)["cnf"]["x5t#S256"], device.thumbprint());
    site.shutdown().await;
}
