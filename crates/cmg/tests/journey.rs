//! The client's must-show cases (issue 5) with real processes of the `cmg` binary on loopback:
//! `cmg up` (site, management point, connection point and gateway) on ports the OS chose, and
//! `cmg client install | run | status` against it, changed while they run with `cmg admin`.
//!
//! Where a case needs the device's network to change, the test owns it: the client reaches every
//! `localhost` name at 127.0.0.2 (`--resolve`), where the test's TCP forwarders relay to the roles
//! on 127.0.0.1. Cutting the forwarder in front of the management point takes the device off the
//! intranet; the roles themselves (the connection point reaches the MP directly) do not notice.
//! (A forwarder on another port would not do: the site lists its MP as `https://localhost:PORT`,
//! and the client tries every intranet MP it was told about.)
//!
//! Tokens are checked with five minutes of clock leeway, so a token "past validity" cannot be
//! had by shortening `token_validity` within a test's time: the expired tokens are signed by the
//! test with the site's own token signing key instead.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Installs with `args`, retrying (uninstall, install) until the client's first policy satisfies
/// `ready`: a setting changed with `cmg admin` reaches the running site within a second or two,
/// and the agent takes intervals from policy only.
fn install_with_policy(dir: &Path, args: &[String], state: &str, ready: impl Fn(&Value) -> bool) {
    wait_until("a first policy with the new settings", secs(20), || {
        cmg_ok(dir, &strs(args));
        let status = client_status(dir, state);
        if ready(&status) {
            return Some(());
        }
        cmg_ok(dir, &["client", "uninstall", "--state-dir", state]);
        None
    });
}

/// Forwarders at 127.0.0.2 in front of the gateway (started) and the MP (not started), on the
/// ports `cmg up` got.
fn forwarders(up: &Up) -> (Forwarder, Forwarder) {
    let at = |ip: [u8; 4], port: u16| SocketAddr::from((ip, port));
    let mut gateway = Forwarder::new(
        at([127, 0, 0, 2], up.gateway_port),
        at([127, 0, 0, 1], up.gateway_port),
    );
    gateway.start();
    let intranet = Forwarder::new(
        at([127, 0, 0, 2], up.mp_port),
        at([127, 0, 0, 1], up.mp_port),
    );
    (gateway, intranet)
}

fn str_of<'a>(value: &'a Value, field: &str) -> &'a str {
    value[field].as_str().unwrap_or_default()
}

/// `cmg up` with policy (and with it the intranet check) every 2 s, the forwarders with the
/// intranet one up, and a roaming client installed on the intranet: `(up, gateway forwarder,
/// intranet forwarder, client ID)`.
fn roaming_client_on_the_intranet(dir: &Path) -> (Up, Forwarder, Forwarder, String) {
    let up = Up::start(dir);
    cmg_ok(dir, &["admin", "settings", "set", "policy_interval", "2s"]);
    let (gateway, mut intranet) = forwarders(&up);
    intranet.start();
    let args = up.roaming_install_args("./cmg-client");
    install_with_policy(dir, &args, "./cmg-client", |s| {
        s["policy_interval_secs"] == 2
    });
    let installed = client_status(dir, "./cmg-client");
    assert_eq!(installed["registered_via"], "InternalNetwork");
    let client_id = str_of(&installed, "client_id").to_owned();
    (up, gateway, intranet, client_id)
}

#[test]
fn an_expired_bulk_token_fails_the_install_with_the_reason_and_leaves_nothing() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let up = Up::start(dir);

    // Signed with the site's own token signing key, valid for one minute ten days ago: expired
    // far beyond the five minutes of clock leeway.
    let expired = block_on(async {
        let site = open_site(dir).await;
        let now = cmg_site::unix_now();
        let (token, _) = site
            .issuer()
            .expect("the site holds its token signing key")
            .mint_bulk(
                "9a3e7c52-4a40-4a8e-9d7c-3c2f0e6b1a11",
                now - 10 * 86_400,
                60,
            )
            .unwrap();
        site.close().await;
        token.expose().to_owned()
    });
    let args: Vec<String> = up
        .install_args("./cmg-client-expired")
        .into_iter()
        .map(|a| {
            if a.starts_with("/regtoken:") {
                format!("/regtoken:{expired}")
            } else {
                a
            }
        })
        .collect();
    let out = cmg(dir, &strs(&args));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("CMGService_Token_Expired") && stderr.contains("expired"),
        "{stderr}"
    );
    assert!(!stderr.contains(&expired), "the error shows the token");
    let state = dir.join("cmg-client-expired");
    assert_installed_nothing(&state);
    let setup = client_log(dir, "cmg-client-expired", "ccmsetup");
    assert!(setup.contains("CMGService_Token_Expired"), "{setup}");
    assert!(
        setup
            .lines()
            .last()
            .unwrap()
            .contains("CcmSetup is exiting with return code 1"),
        "{setup}"
    );
    assert_eq!(contains(&state, &expired), None, "the bulk token was kept");
    assert!(
        !cmg(
            dir,
            &["client", "status", "--state-dir", "./cmg-client-expired"]
        )
        .status
        .success()
    );

    // The same command with the token `cmg up` printed installs: the expiry was the reason.
    cmg_ok(dir, &strs(&up.install_args("./cmg-client")));
    assert_eq!(
        str_of(&client_status(dir, "./cmg-client"), "registered_via"),
        "BulkRegistration"
    );
}

#[test]
fn a_running_agent_renews_its_token_through_the_gateway_once_older_than_the_renewal_interval() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let up = Up::start(dir);
    cmg_ok(dir, &["admin", "settings", "set", "token_renewal", "3s"]);
    install_with_policy(dir, &up.install_args("./cmg-client"), "./cmg-client", |s| {
        s["token_renewal_secs"] == 3
    });
    let installed = client_status(dir, "./cmg-client");
    let client_id = str_of(&installed, "client_id").to_owned();
    let token_file = dir.join("cmg-client/client.token");
    let first = cmg_testkit::claims(std::fs::read_to_string(&token_file).unwrap().trim());

    // Renewed at start, then whenever the token is older than 3 s: three new tokens in a row
    // from one agent process.
    let agent = AgentProcess::start(dir, "./cmg-client");
    let mut tokens = vec![first.clone()];
    wait_until("three renewals", secs(40), || {
        let text = std::fs::read_to_string(&token_file).ok()?;
        let claims = cmg_testkit::claims(text.trim());
        if claims["jti"] != tokens.last().unwrap()["jti"] {
            tokens.push(claims);
        }
        (tokens.len() >= 4).then_some(())
    });
    let iat = |claims: &Value| claims["iat"].as_i64().unwrap();
    for (n, pair) in tokens.windows(2).enumerate() {
        let (old, new) = (&pair[0], &pair[1]);
        assert_eq!(new["sub"], client_id.as_str());
        assert_eq!(new["cnf"], first["cnf"], "the same certificate binding");
        // At start at once; after that, when the token is 3 s old.
        let wait = if n == 0 { 0 } else { 3 };
        assert!(iat(new) >= iat(old) + wait, "{old} {new}");
        assert_eq!(
            new["exp"].as_i64().unwrap() - new["iat"].as_i64().unwrap(),
            90 * 86_400
        );
    }
    let status = client_status(dir, "./cmg-client");
    assert!(status["token_renewed"].as_i64() >= tokens.last().unwrap()["iat"].as_i64());
    assert!(status["token_expires"].as_i64() > installed["token_expires"].as_i64());
    assert_eq!(status["connection_type"], "Always Internet");
    assert_eq!(status["last_error"], Value::Null);

    // The client's and the site's logs show each renewal, through the gateway.
    let client = client_log(dir, "cmg-client", "ClientIDManagerStartup");
    let line = format!(
        "[RegTask] - Renewed the client token through {}",
        up.cmg_url
    );
    assert!(client.matches(&line).count() >= 3, "{client}");
    let sts = site_log(dir, "CCM_STS");
    let line = format!("Renewed the client token of {client_id} (CMG LocalCMG)");
    assert!(sts.matches(&line).count() >= 3, "{sts}");
    agent.stop();
}

/// A copy of `token` signed with the site's token signing key (the key file `cmg up` created),
/// issued 91 days ago and expired a day ago: the same client, the same certificate binding.
fn expired_copy(dir: &Path, token: &str) -> String {
    let header = jsonwebtoken::decode_header(token).unwrap();
    let mut claims = cmg_testkit::claims(token);
    let now = cmg_site::unix_now();
    claims["iat"] = json!(now - 91 * 86_400);
    claims["nbf"] = json!(now - 91 * 86_400);
    claims["exp"] = json!(now - 86_400);
    claims["jti"] = json!("b7f1d9a2-expired-by-the-test");
    let keys: Vec<_> = std::fs::read_dir(dir.join(DATA).join("pki"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with("token-signing-") && name.ends_with(".key")
        })
        .collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let key = jsonwebtoken::EncodingKey::from_ec_pem(&std::fs::read(&keys[0]).unwrap()).unwrap();
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

#[test]
fn a_token_past_its_validity_is_replaced_by_registering_again_once_the_intranet_mp_answers() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let up = Up::start(dir);
    let (_gateway, mut intranet) = forwarders(&up);

    // Installed on the internet: the intranet MP does not answer, so through the CMG.
    cmg_ok(dir, &strs(&up.roaming_install_args("./cmg-client")));
    let installed = client_status(dir, "./cmg-client");
    assert_eq!(installed["registered_via"], "BulkRegistration");
    assert_eq!(installed["connection_type"], "Currently Internet");
    let client_id = str_of(&installed, "client_id").to_owned();

    // Its token runs out.
    let token_file = dir.join("cmg-client/client.token");
    let token = std::fs::read_to_string(&token_file).unwrap();
    write_file(&token_file, &expired_copy(dir, token.trim()));

    // On the internet the agent can only say so and wait.
    let agent = AgentProcess::start(dir, "./cmg-client");
    let waiting = wait_until("the agent to find its token expired", secs(30), || {
        let status = client_status(dir, "./cmg-client");
        (status["reregistration_needed"] == true).then_some(status)
    });
    assert!(
        str_of(&waiting, "action").contains("internal network"),
        "{waiting}"
    );
    assert!(
        str_of(&waiting, "last_error").contains("expired"),
        "{waiting}"
    );
    let log = client_log(dir, "cmg-client", "ClientIDManagerStartup");
    assert!(
        log.contains("[RegTask] - The client token expired. The client must reach a management point on the internal network to register again."),
        "{log}"
    );

    // Back on the intranet, it registers again by itself: same client ID, a new 90-day token.
    intranet.start();
    let again = wait_until("registration on the intranet", secs(40), || {
        let status = client_status(dir, "./cmg-client");
        (status["reregistration_needed"] == false && status["registered_via"] == "InternalNetwork")
            .then_some(status)
    });
    assert_eq!(again["client_id"], client_id.as_str());
    assert_eq!(again["connection_type"], "Currently Intranet");
    assert_eq!(
        again["current_management_point"],
        up.intranet_url().as_str()
    );
    assert!(again["token_expires"].as_i64().unwrap() > cmg_site::unix_now() + 89 * 86_400);
    let claims = cmg_testkit::claims(std::fs::read_to_string(&token_file).unwrap().trim());
    assert_eq!(claims["RegisteredVia"], "InternalNetwork");
    assert_eq!(claims["sub"], client_id.as_str());
    let log = client_log(dir, "cmg-client", "ClientIDManagerStartup");
    assert_eq!(
        log.matches(&format!(
            "[RegTask] - Client is registered. Server assigned ClientID is {client_id} Approval status 1"
        ))
        .count(),
        2,
        "{log}"
    );
    let site = site_log(dir, "MP_RegistrationManager");
    assert!(
        site.contains(&format!("Successfully registered {client_id} ("))
            && site.contains("InternalNetwork) via Intranet"),
        "{site}"
    );
    agent.stop();
}

#[test]
fn the_connection_type_follows_the_reachability_of_the_intranet_mp_unless_always_internet() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let (up, _gateway, mut intranet, client_id) = roaming_client_on_the_intranet(dir);
    let agent = AgentProcess::start(dir, "./cmg-client");
    let seen_via = |via: &str| {
        wait_until(
            &format!("the site to see the client via {via}"),
            secs(20),
            || (device(dir, &client_id)["last_seen_via"] == via).then_some(()),
        )
    };
    let connection = |kind: &str, mp: &str| {
        wait_until(&format!("{kind} through {mp}"), secs(30), || {
            let status = client_status(dir, "./cmg-client");
            (status["connection_type"] == kind && status["current_management_point"] == mp)
                .then_some(())
        })
    };
    connection("Currently Intranet", &up.intranet_url());
    seen_via("Intranet");

    // Off the intranet: the gateway.
    intranet.stop();
    connection("Currently Internet", &up.cmg_url);
    seen_via("CMG LocalCMG");
    // Back: the intranet MP again.
    intranet.start();
    connection("Currently Intranet", &up.intranet_url());
    seen_via("Intranet");
    let location = client_log(dir, "cmg-client", "ClientLocation");
    for line in [
        "Client is on the internet (connection type Currently Internet)",
        "Client is on the intranet (connection type Currently Intranet)",
    ] {
        assert!(location.contains(line), "{location}");
    }
    agent.stop();

    // CCMALWAYSINF=1: the gateway, although the intranet MP answers all along.
    let mut always = up.roaming_install_args("./cmg-client-always");
    always.push("CCMALWAYSINF=1".into());
    cmg_ok(dir, &strs(&always));
    let installed = client_status(dir, "./cmg-client-always");
    assert_eq!(installed["registered_via"], "BulkRegistration");
    let always_id = str_of(&installed, "client_id").to_owned();
    let agent = AgentProcess::start(dir, "./cmg-client-always");
    let status = wait_until("two more policy polls", secs(30), || {
        let status = client_status(dir, "./cmg-client-always");
        (status["last_policy"].as_i64() >= installed["last_policy"].as_i64().map(|t| t + 2))
            .then_some(status)
    });
    assert_eq!(status["connection_type"], "Always Internet");
    assert_eq!(status["current_management_point"], up.cmg_url.as_str());
    assert_eq!(status["last_error"], Value::Null);
    wait_until("the site to see it via the CMG", secs(20), || {
        (device(dir, &always_id)["last_seen_via"] == "CMG LocalCMG").then_some(())
    });
    assert!(!client_log(dir, "cmg-client-always", "ClientLocation").contains("Currently Intranet"));
    agent.stop();
}

#[test]
fn status_messages_produced_while_the_gateway_is_down_arrive_after_it_is_back_once_each() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let mut up = Up::start(dir);
    // Default intervals: while the agent is idle only queued messages make it send, so a
    // message queued during the outage fails in delivery itself.
    cmg_ok(dir, &strs(&up.install_args("./cmg-client")));
    let client_id = str_of(&client_status(dir, "./cmg-client"), "client_id").to_owned();
    let state = dir.join("cmg-client");
    // Status messages come from other components of the device, through the client's queue.
    let mut ids = Vec::new();
    let produce = |ids: &mut Vec<String>, n: u32| {
        ids.push(
            cmg_client::queue::enqueue(&state, cmg_client::MessageKind::Status, json!({ "n": n }))
                .unwrap(),
        );
    };
    let mut agent = AgentProcess::start(dir, "./cmg-client");
    produce(&mut ids, 0);
    wait_until("the first message at the site", secs(20), || {
        stored_messages(dir, &client_id)
            .iter()
            .any(|(_, id)| id == &ids[0])
            .then_some(())
    });

    // The gateway goes down (with every other role of `cmg up`), while messages keep coming.
    up.kill();
    produce(&mut ids, 1);
    produce(&mut ids, 2);
    wait_until("the agent to fail to send to the gateway", secs(30), || {
        let status = client_status(dir, "./cmg-client");
        (str_of(&status, "last_error").contains("cannot reach")
            && status["queued_messages"].as_u64() >= Some(2)
            && client_log(dir, "cmg-client", "CcmMessaging").contains("they stay queued"))
        .then_some(())
    });
    // The agent restarts offline (its start-up heartbeat is queued too), and more arrive.
    agent.stop();
    agent = AgentProcess::start(dir, "./cmg-client");
    produce(&mut ids, 3);
    wait_until(
        "the restarted agent to queue its heartbeat",
        secs(20),
        || {
            (client_status(dir, "./cmg-client")["queued_messages"].as_u64() >= Some(4))
                .then_some(())
        },
    );

    // Back on the same ports.
    up.restart();
    produce(&mut ids, 4);
    wait_until("the queue to drain", secs(60), || {
        let status = client_status(dir, "./cmg-client");
        (status["queued_messages"] == 0 && status["last_error"].is_null()).then_some(())
    });
    let stored = stored_messages(dir, &client_id);
    let status_ids: Vec<&String> = stored
        .iter()
        .filter(|(kind, _)| kind == "Status")
        .map(|(_, id)| id)
        .collect();
    assert_eq!(
        status_ids,
        ids.iter().collect::<Vec<_>>(),
        "each once, in order"
    );
    // Heartbeats: install, the first agent start, the restart — each once.
    assert_eq!(
        stored
            .iter()
            .filter(|(kind, _)| kind == "Heartbeat")
            .count(),
        3,
        "{stored:?}"
    );
    agent.stop();
}

#[test]
fn with_cmg_use_disabled_by_the_site_the_agent_uses_only_the_intranet_mp() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let (up, _gateway, mut intranet, client_id) = roaming_client_on_the_intranet(dir);
    let agent = AgentProcess::start(dir, "./cmg-client");

    cmg_ok(dir, &["admin", "settings", "set", "enable_cmg", "no"]);
    wait_until("the policy that disables CMG use", secs(20), || {
        (client_status(dir, "./cmg-client")["cmg_enabled"] == false).then_some(())
    });
    let location = client_log(dir, "cmg-client", "ClientLocation");
    assert!(
        location.contains(
            "CMG use is disabled by client policy (enable_cmg = no): only intranet management points are used"
        ),
        "{location}"
    );

    // Off the intranet: no management point at all, rather than the gateway.
    intranet.stop();
    let status = wait_until("the client to stop short of the gateway", secs(30), || {
        let status = client_status(dir, "./cmg-client");
        (status["connection_type"] == "Currently Internet"
            && status["current_management_point"].is_null())
        .then_some(status)
    });
    assert!(
        str_of(&status, "last_error").contains("enable_cmg = no"),
        "{status}"
    );
    assert!(
        str_of(&status, "action").contains("internal network"),
        "{status}"
    );
    let state = dir.join("cmg-client");
    let queued =
        cmg_client::queue::enqueue(&state, cmg_client::MessageKind::Status, json!({"n": 1}))
            .unwrap();
    let failed = |log: &str| log.matches("Cycle failed: CMG use is disabled").count();
    let before = failed(&client_log(dir, "cmg-client", "CcmMessaging"));
    wait_until(
        "another cycle after the message was queued",
        secs(30),
        || (failed(&client_log(dir, "cmg-client", "CcmMessaging")) > before).then_some(()),
    );
    assert!(
        !stored_messages(dir, &client_id)
            .iter()
            .any(|(_, id)| id == &queued),
        "the message went through the gateway"
    );
    assert!(client_status(dir, "./cmg-client")["queued_messages"].as_u64() >= Some(1));
    assert_eq!(device(dir, &client_id)["last_seen_via"], "Intranet");

    // Back on the intranet it delivers; the site enables CMG use again; off the intranet the
    // gateway is used again.
    intranet.start();
    wait_until("delivery on the intranet", secs(40), || {
        stored_messages(dir, &client_id)
            .iter()
            .any(|(_, id)| id == &queued)
            .then_some(())
    });
    cmg_ok(dir, &["admin", "settings", "set", "enable_cmg", "yes"]);
    wait_until("the policy that enables CMG use", secs(20), || {
        (client_status(dir, "./cmg-client")["cmg_enabled"] == true).then_some(())
    });
    intranet.stop();
    wait_until("the gateway in use again", secs(40), || {
        let status = client_status(dir, "./cmg-client");
        (status["connection_type"] == "Currently Internet"
            && status["current_management_point"] == up.cmg_url.as_str())
        .then_some(())
    });
    wait_until("the site to see the client via the CMG", secs(20), || {
        (device(dir, &client_id)["last_seen_via"] == "CMG LocalCMG").then_some(())
    });
    agent.stop();
}

#[test]
fn a_pki_client_installs_through_a_cmg_that_trusts_its_ca() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let up = Up::start(dir);
    // The organisation's PKI, made by cmg-pki: the issuing root of a second, unrelated site is
    // the CA, and the client-authentication certificate that root issued (the one meant for its
    // connection point) is the device's PKI certificate.
    cmg_ok(
        dir,
        &["--data", "./pki", "site", "init", "--site-code", "PKI"],
    );
    let (ca, cert, key) = (
        "./pki/pki/site-root.crt",
        "./pki/pki/connection-point.crt",
        "./pki/pki/connection-point.key",
    );
    let mut args: Vec<String> = up
        .install_args("./cmg-client")
        .into_iter()
        .filter(|a| !a.starts_with("/regtoken:"))
        .collect();
    args.extend(
        ["/UsePKICert", "--pki-cert", cert, "--pki-key", key]
            .iter()
            .map(|a| a.to_string()),
    );
    let install = || cmg(dir, &strs(&args));
    let refusal = |out: &std::process::Output| {
        assert!(!out.status.success());
        assert_installed_nothing(&dir.join("cmg-client"));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };

    // The CMG does not trust the CA yet: the certificate counts for nothing, and no token came.
    let untrusted = refusal(&install());
    assert!(
        untrusted.contains("CMGService_Invalid_Token"),
        "{untrusted}"
    );

    // Trusted, with the CRL check on and no CRL published: the gateway cannot vouch for it.
    cmg_ok(
        dir,
        &["admin", "cmg", "modify", "LocalCMG", "--trusted-ca", ca],
    );
    wait_until("the gateway to trust the CA", secs(20), || {
        let stderr = refusal(&install());
        stderr
            .contains("CMGService_Revocation_Unknown")
            .then_some(())
    });

    // Without the CRL check: installed with the PKI certificate, no bulk token.
    cmg_ok(
        dir,
        &["admin", "cmg", "modify", "LocalCMG", "--crl-check", "no"],
    );
    wait_until("a PKI install through the gateway", secs(20), || {
        let out = install();
        if out.status.success() {
            return Some(());
        }
        let stderr = refusal(&out);
        assert!(stderr.contains("CMGService_Revocation_Unknown"), "{stderr}");
        None
    });
    let status = client_status(dir, "./cmg-client");
    assert_eq!(status["registered_via"], "PKI");
    assert_eq!(status["connection_type"], "Always Internet");
    assert_eq!(status["current_management_point"], up.cmg_url.as_str());
    assert_eq!(status["last_error"], Value::Null);
    assert_eq!(
        std::fs::read_to_string(dir.join("cmg-client/client.crt")).unwrap(),
        std::fs::read_to_string(dir.join(cert)).unwrap(),
        "the PKI certificate is the client's identity"
    );
    let client_id = str_of(&status, "client_id");
    let record = device(dir, client_id);
    assert_eq!(record["registered_via"], "PKI");
    let log = client_log(dir, "cmg-client", "ClientIDManagerStartup");
    assert!(
        log.contains(&format!(
            "[RegTask] - Client is registered. Server assigned ClientID is {client_id} Approval status 1"
        )),
        "{log}"
    );
}
