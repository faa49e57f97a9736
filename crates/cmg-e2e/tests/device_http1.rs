//! Devices speaking HTTP/1.1, as Configuration Manager clients do. The gateway serves them with
//! its own lean HTTP/1.1 loop (no buffer held while a connection idles). HTTP/1.1 is what the
//! gateway offers by default, so the rules of DESIGN §4 are covered over it in `gateway.rs`; this
//! file checks what is particular to the loop: the protocol spoken, whole bodies both ways,
//! pipelining, and the framing a hostile request could abuse.

use std::sync::Arc;

use cmg_testkit::{TestCmg, TestSite};
use reqwest::{StatusCode, Version};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn over_http1_a_device_registers_polls_and_reports_and_an_oversized_body_gets_413() {
    let site = TestSite::start(cmg_store::testing::sqlite_store().await).await;
    let cmg = site.cmg(2).await;
    let admin = site.admin().await;
    let bulk = admin.new_bulk_token(Default::default()).await.unwrap();

    let device = cmg.device(0, "h1-device").speaking_http1();
    let (client_id, token) = device.register_ok(Some(bulk.token.expose())).await;
    let other_instance = cmg
        .device_with(1, "h1-device", device.credential.clone())
        .speaking_http1();
    let reply = other_instance
        .client()
        .get(format!("{}/SMS_MP/.sms_pol", other_instance.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.version(), Version::HTTP_11);
    assert_eq!(reply.status(), StatusCode::OK);
    let policy: Value = reply.json().await.unwrap();
    assert_eq!(policy["enable_cmg"], true);
    // A request body goes through whole.
    let filler = "y".repeat(20_000);
    let batch = json!({"messages": [
        {"id": "h1-msg-1", "kind": "Heartbeat", "time": 1, "body": {"x": filler}}
    ]});
    let (status, ack) = device.status(&token, &batch).await;
    assert_eq!(
        (status, &ack["accepted"]),
        (StatusCode::OK, &json!(1)),
        "{ack}"
    );
    let stored = site
        .site()
        .store()
        .status_messages(&client_id)
        .await
        .unwrap();
    assert_eq!(stored.len(), 1);
    let body: Value = serde_json::from_str(&stored[0].message.body).unwrap();
    assert_eq!(body["x"], filler);
    // One byte over the limit.
    let reply = device
        .client()
        .post(format!("{}/ccm_system/request", device.base))
        .bearer_auth(&token)
        .body(vec![b'x'; cmg_gateway::MAX_BODY_BYTES + 1])
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = reply.json().await.unwrap();
    assert_eq!(body["error"], "CMGService_Request_Too_Large");
    cmg.shutdown().await;
    site.shutdown().await;
}

/// A TLS connection to instance 0 with a device certificate, speaking HTTP/1.1.
async fn raw_connection(cmg: &TestCmg) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let device =
        cmg_pki::self_signed_device("device-raw", cmg_pki::KeyAlgorithm::EcdsaP256).unwrap();
    let config = cmg_pki::tls::client_config(
        device.cert_pem(),
        device.key_pem(),
        &[&cmg.ca_pem],
        &[b"http/1.1"],
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(cmg.gateways[0].device_addr())
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from(cmg.fqdn.clone()).unwrap();
    tokio_rustls::TlsConnector::from(Arc::clone(&config))
        .connect(name, tcp)
        .await
        .unwrap()
}

/// Everything the gateway sends until it closes the connection (or 10 s pass).
async fn read_to_close(
    stream: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> String {
    let mut out = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut out),
    )
    .await;
    assert!(read.is_ok(), "the gateway did not close the connection");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_and_a_smuggling_attempt_is_refused_and_closed() {
    let site = TestSite::start(cmg_store::testing::sqlite_store().await).await;
    let cmg = site.cmg(1).await;
    let host = &cmg.fqdn;

    // Two requests in one write, then a third that closes: three answers, in order.
    let mut stream = raw_connection(&cmg).await;
    let metadata =
        format!("GET /CCM_Proxy_MutualAuth/ServiceMetadata HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let unmapped = format!("GET /admin HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let last = format!(
        "GET /CCM_Proxy_MutualAuth/ServiceMetadata HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(format!("{metadata}{unmapped}{last}").as_bytes())
        .await
        .unwrap();
    let answers = read_to_close(&mut stream).await;
    let statuses: Vec<&str> = answers
        .match_indices("HTTP/1.1 ")
        .map(|(at, _)| &answers[at + 9..at + 12])
        .collect();
    assert_eq!(statuses, ["200", "404", "200"], "{answers}");
    assert!(answers.contains("CMGService_Url_Not_Allowed"), "{answers}");

    // Content-Length and Transfer-Encoding together: the request behind it must not be served.
    let mut stream = raw_connection(&cmg).await;
    let smuggled = format!(
        "POST /CCM_Proxy_MutualAuth/ServiceMetadata HTTP/1.1\r\nHost: {host}\r\n\
         Content-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
         GET /CCM_Proxy_MutualAuth/ServiceMetadata HTTP/1.1\r\nHost: {host}\r\n\r\n"
    );
    stream.write_all(smuggled.as_bytes()).await.unwrap();
    let answer = read_to_close(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("CMGService_Bad_Request"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");

    // A head beyond the limit.
    let mut stream = raw_connection(&cmg).await;
    let huge = format!(
        "GET /CCM_Proxy_MutualAuth/ServiceMetadata HTTP/1.1\r\nHost: {host}\r\nX-Filler: {}\r\n\r\n",
        "a".repeat(cmg_gateway::MAX_HEAD_BYTES)
    );
    stream.write_all(huge.as_bytes()).await.unwrap();
    let answer = read_to_close(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
    assert!(
        answer.contains("CMGService_Request_Header_Too_Large"),
        "{answer}"
    );
    cmg.shutdown().await;
    site.shutdown().await;
}

#[tokio::test]
async fn http2_is_offered_to_devices_only_when_the_gateway_configuration_asks_for_it() {
    for (http2, version) in [(false, Version::HTTP_11), (true, Version::HTTP_2)] {
        let site = TestSite::start(cmg_store::testing::sqlite_store().await).await;
        let admin = site.admin().await;
        let bulk = admin.new_bulk_token(Default::default()).await.unwrap();
        let cmg = site
            .cmg_with_gateways(1, |_| {}, |g| g.device_http2 = http2)
            .await;
        // The client offers both protocols; the gateway picks.
        let device = cmg.device(0, &format!("alpn-{http2}"));
        let (_, token) = device.register_ok(Some(bulk.token.expose())).await;
        let reply = device
            .client()
            .get(format!("{}/SMS_MP/.sms_pol", device.base))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(
            (reply.status(), reply.version()),
            (StatusCode::OK, version),
            "device_http2 = {http2}"
        );
        cmg.shutdown().await;
        site.shutdown().await;
    }
}
