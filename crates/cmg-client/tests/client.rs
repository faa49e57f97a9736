//! The client against real roles on loopback (cmg-testkit): install through the CMG with a bulk
//! token, refusals that leave nothing installed, renewal, the offline status queue, intranet
//! versus internet, and re-registration after the token expired.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cmg_client::state::{CERT_FILE, KEY_FILE, STATE_FILE, TOKEN_FILE, TRUST_FILE};
use cmg_client::{Agent, AgentError, AgentOptions, InstallError, InstallOptions};
use cmg_testkit::{TestCmg, TestSite};

fn agent_options() -> AgentOptions {
    AgentOptions {
        request_timeout: Duration::from_secs(10),
        probe_timeout: Duration::from_secs(3),
        ..AgentOptions::default()
    }
}

/// `https://<CMG FQDN>:<port>/CCM_Proxy_MutualAuth/<role>` of gateway instance 0.
fn gateway_url(site: &TestSite, cmg: &TestCmg) -> String {
    format!(
        "https://{}:{}/CCM_Proxy_MutualAuth/{}",
        cmg.fqdn,
        cmg.gateways[0].device_addr().port(),
        site.mp_role_id()
    )
}

struct Setup {
    dir: tempfile::TempDir,
    trust: PathBuf,
}

impl Setup {
    /// A temp dir with `trust.pem` holding `roots`.
    fn new(roots: &[&str]) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let trust = dir.path().join("trust.pem");
        std::fs::write(&trust, roots.join("\n")).unwrap();
        Setup { dir, trust }
    }

    fn state(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// The documented command line, pointed at the test CMG, plus the test's flags.
fn command_line(
    site: &TestSite,
    cmg: &TestCmg,
    setup: &Setup,
    state: &Path,
    token: &str,
    extra: &str,
) -> InstallOptions {
    let url = gateway_url(site, cmg);
    let line = format!(
        "/mp:{url} CCMHOSTNAME={} SMSSiteCode=TST /regtoken:{token} {extra} --trust-ca {} --state-dir {} --resolve {}={}",
        url.strip_prefix("https://").unwrap(),
        setup.trust.display(),
        state.display(),
        cmg.fqdn,
        cmg.gateways[0].device_addr(),
    );
    let args: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
    InstallOptions::parse(&args).unwrap()
}

fn log(state: &Path, name: &str) -> String {
    std::fs::read_to_string(state.join("logs").join(format!("{name}.log"))).unwrap_or_default()
}

/// Every file under `dir`, with its bytes.
fn all_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(all_files(&path));
        } else {
            let bytes = std::fs::read(&path).unwrap();
            out.push((path, bytes));
        }
    }
    out
}

fn assert_no_trace(dir: &Path, secret: &str) {
    for (path, bytes) in all_files(dir) {
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{} holds the secret",
            path.display()
        );
    }
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn install_through_the_gateway_with_a_bulk_token_makes_a_working_client() {
    let site = TestSite::start(cmg_store::testing::sqlite_store().await).await;
    let cmg = site.cmg(1).await;
    let bulk = site
        .admin()
        .await
        .new_bulk_token(Default::default())
        .await
        .unwrap();
    let setup = Setup::new(&[&cmg.ca_pem]);
    let state = setup.state("client");
    let mut options = command_line(&site, &cmg, &setup, &state, bulk.token.expose(), "");
    options.hardware_id = Some("hw-install-1".into());
    options.service = Some(setup.state("cmg-client.service"));

    let report = cmg_client::install::install_with(&options, agent_options())
        .await
        .unwrap();
    assert_eq!(report.registered_via, "BulkRegistration");
    assert_eq!(report.approval, 1);
    assert!(report.client_id.starts_with("GUID:"));
    assert!(
        report
            .summary()
            .contains("systemctl enable --now cmg-client")
    );
    let unit = std::fs::read_to_string(setup.state("cmg-client.service")).unwrap();
    assert!(unit.contains("client run --state-dir"), "{unit}");

    // Key and token owner-only; the certificate and state beside them.
    #[cfg(unix)]
    {
        assert_eq!(mode(&state.join(TOKEN_FILE)), 0o600);
        assert_eq!(mode(&state.join(KEY_FILE)), 0o600);
    }
    assert!(state.join(CERT_FILE).exists() && state.join(STATE_FILE).exists());
    let client_token = std::fs::read_to_string(state.join(TOKEN_FILE)).unwrap();

    // The documented lines.
    let registered = log(&state, "ClientIDManagerStartup");
    assert!(
        registered.contains(&format!(
            "[RegTask] - Client is registered. Server assigned ClientID is {} Approval status 1]LOG]!>",
            report.client_id
        )),
        "{registered}"
    );
    let location = log(&state, "ClientLocation");
    let rotation = format!(
        "Rotating internet management point, new management point [1] is: {} (0) with capabilities: <Capabilities SchemaVersion =\"1.0\"><Property Name=\"SSL\" Version=\"1\" /></Capabilities>]LOG]!>",
        gateway_url(&site, &cmg)
    );
    assert!(location.contains(&rotation), "{location}");
    assert_eq!(
        location.matches("Rotating internet").count(),
        1,
        "{location}"
    );
    let setup_log = log(&state, "ccmsetup");
    let last = setup_log.lines().last().unwrap();
    assert!(
        last.starts_with("<![LOG[CcmSetup is exiting with return code 0]LOG]!>"),
        "{setup_log}"
    );
    assert!(log(&state, "PolicyAgent").contains("Applied client settings"));
    assert!(log(&state, "CcmMessaging").contains("Sent 1 message(s)"));

    // Status: internet, the token's expiry, the MP list with types.
    let status = cmg_client::status(&state).unwrap();
    assert_eq!(status.client_id, report.client_id);
    assert_eq!(status.site_code, "TST");
    assert_eq!(status.connection_type, "Currently Internet");
    assert!(status.token_expires.unwrap() > cmg_site::unix_now() + 80 * 86400);
    assert!(status.last_policy.is_some() && status.last_location.is_some());
    assert!(
        status
            .management_points
            .iter()
            .any(|m| m.kind == "Internet")
    );
    assert!(
        status
            .management_points
            .iter()
            .any(|m| m.kind == "Intranet")
    );
    let json = serde_json::to_value(&status).unwrap();
    assert_eq!(json["connection_type"], "Currently Internet");
    assert!(
        status
            .to_string()
            .contains("Connection type:    Currently Internet")
    );

    // The site saw the device and its first heartbeat.
    let store = site.site().store();
    let device = store.device(&report.client_id).await.unwrap().unwrap();
    assert_eq!(device.last_seen_via.as_deref(), Some("CMG GraniteFalls"));
    let messages = store.status_messages(&report.client_id).await.unwrap();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].message.kind, "Heartbeat");

    // No trace of the bulk token anywhere, and none of the client token outside its file.
    assert_no_trace(&state, bulk.token.expose());
    assert_no_trace(&state.join("logs"), client_token.trim());
    assert!(
        !std::fs::read_to_string(state.join(STATE_FILE))
            .unwrap()
            .contains(client_token.trim())
    );

    // A second install in the same place is refused; uninstall removes everything.
    let again = cmg_client::install(&options).await.unwrap_err();
    assert!(
        matches!(again, InstallError::AlreadyInstalled(_)),
        "{again}"
    );
    cmg_client::uninstall(&state).unwrap();
    assert!(!state.exists());
    cmg.shutdown().await;
    site.shutdown().await;
}

#[tokio::test]
async fn refused_bulk_tokens_leave_nothing_installed_and_say_why() {
    let site = TestSite::start(cmg_store::testing::sqlite_store().await).await;
    let cmg = site.cmg(1).await;
    let admin = site.admin().await;
    let setup = Setup::new(&[&cmg.ca_pem]);
    let now = cmg_site::unix_now();

    // Expired: minted by the site's key ten days ago for a minute.
    let (expired, _) = site
        .site()
        .issuer()
        .expect("the site holds its token signing key")
        .mint_bulk(&uuid_like(1), now - 10 * 86400, 60)
        .unwrap();
    // Tampered: one character of the payload changed.
    let good = admin.new_bulk_token(Default::default()).await.unwrap();
    let mut parts: Vec<String> = good.token.expose().split('.').map(str::to_owned).collect();
    let flipped: String = parts[1]
        .char_indices()
        .map(|(i, c)| {
            if i == 10 {
                if c == 'A' { 'B' } else { 'A' }
            } else {
                c
            }
        })
        .collect();
    parts[1] = flipped;
    let tampered = parts.join(".");
    // Blocked: wait until the gateway itself refuses it.
    let blocked = admin.new_bulk_token(Default::default()).await.unwrap();
    admin
        .block_bulk_token(&blocked.record.id.to_string())
        .await
        .unwrap();
    site.settled().await;
    let probe = cmg.device(0, "probe");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = probe.register(Some(blocked.token.expose())).await;
        if body["error"] == "CMGService_Token_Blocked" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    for (name, token, code) in [
        (
            "expired",
            expired.expose().to_owned(),
            "CMGService_Token_Expired",
        ),
        ("tampered", tampered.clone(), "CMGService_Invalid_Token"),
        (
            "blocked",
            blocked.token.expose().to_owned(),
            "CMGService_Token_Blocked",
        ),
    ] {
        let state = setup.state(name);
        let mut options = command_line(&site, &cmg, &setup, &state, &token, "");
        options.hardware_id = Some(format!("hw-{name}"));
        let error = cmg_client::install::install_with(&options, agent_options())
            .await
            .unwrap_err();
        let text = error.to_string();
        assert_eq!(error.server_code(), Some(code), "{name}: {text}");
        assert!(text.contains(code), "{name}: {text}");
        assert!(!text.contains(&token), "{name}: the error shows the token");
        for file in [STATE_FILE, KEY_FILE, CERT_FILE, TOKEN_FILE, TRUST_FILE] {
            assert!(!state.join(file).exists(), "{name}: {file} left behind");
        }
        let setup_log = log(&state, "ccmsetup");
        assert!(setup_log.contains(code), "{name}: {setup_log}");
        assert!(
            setup_log
                .lines()
                .last()
                .unwrap()
                .contains("CcmSetup is exiting with return code 1"),
            "{setup_log}"
        );
        assert_no_trace(&state, &token);
        assert!(cmg_client::status(&state).is_err());
    }
    cmg.shutdown().await;
    site.shutdown().await;
}

fn uuid_like(n: u8) -> String {
    format!("00000000-0000-4000-8000-0000000000{n:02x}")
}

#[tokio::test]
async fn the_token_is_renewed_through_the_gateway_when_older_than_the_renewal_interval() {
    let site = TestSite::start(cmg_store::testing::sqlite_store().await).await;
    let admin = site.admin().await;
    admin.set_setting("token_renewal", "1s").await.unwrap();
    admin.set_setting("token_validity", "1h").await.unwrap();
    site.settled().await;
    let cmg = site.cmg(1).await;
    let bulk = admin.new_bulk_token(Default::default()).await.unwrap();
    let setup = Setup::new(&[&cmg.ca_pem]);
    let state = setup.state("client");
    let mut options = command_line(&site, &cmg, &setup, &state, bulk.token.expose(), "");
    options.hardware_id = Some("hw-renew".into());
    cmg_client::install::install_with(&options, agent_options())
        .await
        .unwrap();
    let first = std::fs::read_to_string(state.join(TOKEN_FILE)).unwrap();
    assert_eq!(cmg_client::status(&state).unwrap().token_renewal_secs, 1);

    let mut agent = Agent::open_with(&state, agent_options()).unwrap();
    // At start: renewed whatever the token's age.
    let cycle = agent.run_cycle_once().await.unwrap();
    assert!(cycle.renewed && cycle.located, "{cycle:?}");
    assert_eq!(cycle.connection.unwrap().as_str(), "Currently Internet");
    let second = std::fs::read_to_string(state.join(TOKEN_FILE)).unwrap();
    assert_ne!(first, second);
    // Not again at once…
    let cycle = agent.run_cycle_once().await.unwrap();
    assert!(!cycle.renewed, "{cycle:?}");
    // …but once the token is older than the interval.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let cycle = agent.run_cycle_once().await.unwrap();
    assert!(cycle.renewed, "{cycle:?}");
    let third = std::fs::read_to_string(state.join(TOKEN_FILE)).unwrap();
    assert_ne!(second, third);
    assert!(cycle.management_point.contains("/CCM_Proxy_MutualAuth/"));
    assert!(
        log(&state, "ClientIDManagerStartup")
            .contains("[RegTask] - Renewed the client token through https://granitefalls.cmg.test")
    );
    #[cfg(unix)]
    assert_eq!(mode(&state.join(TOKEN_FILE)), 0o600);
    cmg.shutdown().await;
    site.shutdown().await;
}

#[tokio::test]
async fn status_messages_queued_offline_arrive_once_and_in_order() {
    let site = TestSite::start(cmg_store::testing::sqlite_store().await).await;
    let mut cmg = site.cmg(1).await;
    let bulk = site
        .admin()
        .await
        .new_bulk_token(Default::default())
        .await
        .unwrap();
    let setup = Setup::new(&[&cmg.ca_pem]);
    let state = setup.state("client");
    let mut options = command_line(&site, &cmg, &setup, &state, bulk.token.expose(), "");
    options.hardware_id = Some("hw-queue".into());
    let report = cmg_client::install::install_with(&options, agent_options())
        .await
        .unwrap();

    cmg.stop_connector().await;
    let mut agent = Agent::open_with(&state, agent_options()).unwrap();
    let ids: Vec<String> = (0..3)
        .map(|i| agent.queue_status(serde_json::json!({ "n": i })).unwrap())
        .collect();
    let error = agent.run_cycle_once().await.unwrap_err();
    assert!(
        error.to_string().contains("CMGConnector_Unavailable"),
        "{error}"
    );
    let status = cmg_client::status(&state).unwrap();
    assert!(status.queued_messages >= 3);
    assert!(
        status
            .last_error
            .unwrap()
            .contains("CMGConnector_Unavailable")
    );
    drop(agent);

    // The agent restarts while the gateway still has no tunnel; another message is queued.
    let mut agent = Agent::open_with(&state, agent_options()).unwrap();
    let mut ids = ids;
    ids.push(agent.queue_status(serde_json::json!({ "n": 3 })).unwrap());
    assert!(agent.run_cycle_once().await.is_err());

    cmg.start_connector().await;
    let cycle = agent.run_cycle_once().await.unwrap();
    assert!(cycle.delivered >= 4 && cycle.queued == 0, "{cycle:?}");

    // A crash between the acknowledgement and the queue rewrite sends a message again: the MP
    // recognises its ID.
    let again =
        serde_json::json!({ "id": ids[0], "kind": "Status", "time": 1, "body": { "n": 0 } });
    std::fs::write(
        state.join(cmg_client::state::QUEUE_FILE),
        format!("{again}\n"),
    )
    .unwrap();
    let cycle = agent.run_cycle_once().await.unwrap();
    assert_eq!((cycle.delivered, cycle.queued), (1, 0));
    assert!(log(&state, "CcmMessaging").contains("0 accepted, 1 already delivered"));

    let stored: Vec<String> = site
        .site()
        .store()
        .status_messages(&report.client_id)
        .await
        .unwrap()
        .into_iter()
        .filter(|m| m.message.kind == "Status")
        .map(|m| m.message.message_id)
        .collect();
    assert_eq!(stored, ids, "every message once, in order");
    cmg.shutdown().await;
    site.shutdown().await;
}

#[tokio::test]
async fn intranet_when_an_intranet_mp_answers_unless_always_internet() {
    let site = TestSite::start(cmg_store::testing::sqlite_store().await).await;
    let cmg = site.cmg(1).await;
    let bulk = site
        .admin()
        .await
        .new_bulk_token(Default::default())
        .await
        .unwrap();
    let setup = Setup::new(&[&cmg.ca_pem, site.root_pem()]);

    let intranet = setup.state("intranet");
    let mut options = command_line(
        &site,
        &cmg,
        &setup,
        &intranet,
        bulk.token.expose(),
        &format!("SMSMP={}", site.mp_url()),
    );
    options.hardware_id = Some("hw-intranet".into());
    let report = cmg_client::install::install_with(&options, agent_options())
        .await
        .unwrap();
    assert_eq!(report.registered_via, "InternalNetwork");
    let status = cmg_client::status(&intranet).unwrap();
    assert_eq!(status.connection_type, "Currently Intranet");
    assert_eq!(
        status.current_management_point.as_deref(),
        Some(site.mp_url().as_str())
    );
    assert!(!log(&intranet, "ClientLocation").contains("Rotating internet"));

    let always = setup.state("always");
    let mut options = command_line(
        &site,
        &cmg,
        &setup,
        &always,
        bulk.token.expose(),
        &format!("SMSMP={} CCMALWAYSINF=1", site.mp_url()),
    );
    options.hardware_id = Some("hw-always".into());
    let report = cmg_client::install::install_with(&options, agent_options())
        .await
        .unwrap();
    assert_eq!(report.registered_via, "BulkRegistration");
    let mut agent = Agent::open_with(&always, agent_options()).unwrap();
    let cycle = agent.run_cycle_once().await.unwrap();
    assert_eq!(cycle.connection.unwrap().as_str(), "Always Internet");
    assert!(cycle.management_point.contains("/CCM_Proxy_MutualAuth/"));
    let status = cmg_client::status(&always).unwrap();
    assert_eq!(status.connection_type, "Always Internet");
    assert_no_trace(&always, bulk.token.expose());
    cmg.shutdown().await;
    site.shutdown().await;
}

#[tokio::test]
async fn an_expired_token_is_replaced_by_registering_again_on_the_intranet() {
    let site = TestSite::start(cmg_store::testing::sqlite_store().await).await;
    let cmg = site.cmg(1).await;
    let bulk = site
        .admin()
        .await
        .new_bulk_token(Default::default())
        .await
        .unwrap();
    // The device trusts only the CMG: the intranet MP does not answer it.
    let setup = Setup::new(&[&cmg.ca_pem]);
    let state = setup.state("client");
    let mut options = command_line(
        &site,
        &cmg,
        &setup,
        &state,
        bulk.token.expose(),
        &format!("SMSMP={}", site.mp_url()),
    );
    options.hardware_id = Some("hw-expired".into());
    let report = cmg_client::install::install_with(&options, agent_options())
        .await
        .unwrap();
    assert_eq!(report.registered_via, "BulkRegistration");

    // The token runs out (minted by the site 91 days ago for 90 days).
    let cert = std::fs::read_to_string(state.join(CERT_FILE)).unwrap();
    let thumbprint = cmg_pki::thumbprint_sha256(&cmg_pki::pem_to_der(&cert, "client").unwrap());
    let now = cmg_site::unix_now();
    let (expired, _) = site
        .site()
        .issuer()
        .expect("the site holds its token signing key")
        .mint_client(&cmg_token::ClientTokenRequest {
            client_id: &report.client_id,
            cert_thumbprint: &thumbprint,
            registered_via: cmg_proto::RegisteredVia::BulkRegistration,
            bulk_token_id: None,
            token_id: "old",
            now: now - 91 * 86400,
            validity_secs: 90 * 86400,
        })
        .unwrap();
    std::fs::write(state.join(TOKEN_FILE), expired.expose()).unwrap();

    let mut agent = Agent::open_with(&state, agent_options()).unwrap();
    let error = agent.run_cycle_once().await.unwrap_err();
    assert!(
        error.to_string().contains("CMGService_Token_Expired"),
        "{error}"
    );
    let status = cmg_client::status(&state).unwrap();
    assert!(status.reregistration_needed);
    assert!(status.action.unwrap().contains("internal network"));
    assert!(
        log(&state, "ClientIDManagerStartup")
            .contains("must reach a management point on the internal network")
    );
    // Still on the internet: it waits.
    let error = agent.run_cycle_once().await.unwrap_err();
    assert!(matches!(error, AgentError::ReregistrationNeeded), "{error}");

    // Back on the intranet (its MP now answers): it registers again by itself.
    let mut roots = std::fs::read_to_string(state.join(TRUST_FILE)).unwrap();
    roots.push_str(site.root_pem());
    std::fs::write(state.join(TRUST_FILE), roots).unwrap();
    let mut agent = Agent::open_with(&state, agent_options()).unwrap();
    let cycle = agent.run_cycle_once().await.unwrap();
    assert!(cycle.registered_again, "{cycle:?}");
    assert_eq!(cycle.connection.unwrap().as_str(), "Currently Intranet");
    let status = cmg_client::status(&state).unwrap();
    assert!(!status.reregistration_needed && status.last_error.is_none());
    assert_eq!(
        status.client_id, report.client_id,
        "the same hardware ID keeps its client ID"
    );
    assert_eq!(status.registered_via, "InternalNetwork");
    assert!(status.token_expires.unwrap() > now + 80 * 86400);
    assert_eq!(
        log(&state, "ClientIDManagerStartup")
            .matches(&format!(
                "Server assigned ClientID is {} Approval status 1",
                report.client_id
            ))
            .count(),
        2
    );
    cmg.shutdown().await;
    site.shutdown().await;
}

#[tokio::test]
async fn without_a_listed_internet_mp_the_cmg_from_install_is_tried_every_25_hours() {
    let site = TestSite::start(cmg_store::testing::sqlite_store().await).await;
    let cmg = site.cmg(1).await;
    let bulk = site
        .admin()
        .await
        .new_bulk_token(Default::default())
        .await
        .unwrap();
    let setup = Setup::new(&[&cmg.ca_pem]);
    let state = setup.state("client");
    let mut options = command_line(&site, &cmg, &setup, &state, bulk.token.expose(), "");
    options.hardware_id = Some("hw-fallback".into());
    cmg_client::install::install_with(&options, agent_options())
        .await
        .unwrap();

    // The last location answer named no internet MP, and the CMGFQDNs list was checked an
    // hour ago.
    let edit = |f: &dyn Fn(&mut serde_json::Value)| {
        let path = state.join(STATE_FILE);
        let mut json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        f(&mut json);
        std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
    };
    let now = cmg_site::unix_now();
    edit(&|json| {
        let mps = json["management_points"].as_array_mut().unwrap();
        mps.retain(|m| m["kind"] == "Intranet");
        json["last_fallback_check"] = (now - 3600).into();
        json["last_location"] = (now - 3600).into();
    });
    let mut agent = Agent::open_with(&state, agent_options()).unwrap();
    let error = agent.run_cycle_once().await.unwrap_err();
    assert!(matches!(error, AgentError::NoManagementPoint(_)), "{error}");
    assert!(error.to_string().contains("CMGFQDNs"), "{error}");

    // 25 hours later it tries the CMG from install, and the location answer lists it again.
    edit(&|json| json["last_fallback_check"] = (now - 25 * 3600).into());
    let mut agent = Agent::open_with(&state, agent_options()).unwrap();
    let cycle = agent.run_cycle_once().await.unwrap();
    assert!(cycle.located, "{cycle:?}");
    assert!(log(&state, "ClientLocation").contains("trying the CMG from the CMGFQDNs list"));
    let status = cmg_client::status(&state).unwrap();
    assert!(
        status
            .management_points
            .iter()
            .any(|m| m.kind == "Internet")
    );
    cmg.shutdown().await;
    site.shutdown().await;
}

#[tokio::test]
async fn the_agent_runs_until_shutdown_and_stops_gracefully() {
    let site = TestSite::start(cmg_store::testing::sqlite_store().await).await;
    let cmg = site.cmg(1).await;
    let bulk = site
        .admin()
        .await
        .new_bulk_token(Default::default())
        .await
        .unwrap();
    let setup = Setup::new(&[&cmg.ca_pem]);
    let state = setup.state("client");
    let mut options = command_line(&site, &cmg, &setup, &state, bulk.token.expose(), "");
    options.hardware_id = Some("hw-run".into());
    let report = cmg_client::install::install_with(&options, agent_options())
        .await
        .unwrap();
    let id = cmg_client::queue::enqueue(
        &state,
        cmg_proto::mp::MessageKind::Status,
        serde_json::json!({ "from": "run" }),
    )
    .unwrap();

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let dir = state.clone();
    let task = tokio::spawn(async move {
        Agent::run(&dir, async {
            let _ = stopped.await;
        })
        .await
    });
    // The queued message arrives while the agent runs.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let stored = site
            .site()
            .store()
            .status_messages(&report.client_id)
            .await
            .unwrap();
        if stored.iter().any(|m| m.message.message_id == id) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not delivered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A message queued while the agent is idle (nothing else due for an hour) goes out within
    // seconds, not at the next scheduled work.
    let later = cmg_client::queue::enqueue(
        &state,
        cmg_proto::mp::MessageKind::Status,
        serde_json::json!({ "from": "another component" }),
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let stored = site
            .site()
            .store()
            .status_messages(&report.client_id)
            .await
            .unwrap();
        if stored.iter().any(|m| m.message.message_id == later) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a message queued while idle waited"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("stops within 5 s")
        .unwrap()
        .unwrap();
    assert!(log(&state, "CcmMessaging").contains("Agent is stopping"));
    cmg.shutdown().await;
    site.shutdown().await;
}

/// Makes the next cycle poll policy (as if the policy interval had passed).
fn policy_due(state: &Path) {
    let path = state.join(STATE_FILE);
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    json["last_policy"] = serde_json::Value::Null;
    std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
}

/// The roots the client trusts: with the site root the intranet MP answers it, without it not.
fn trust(state: &Path, roots: &[&str]) {
    std::fs::write(state.join(TRUST_FILE), roots.join("\n")).unwrap();
}

async fn stored_ids(site: &TestSite, client_id: &str) -> Vec<String> {
    site.site()
        .store()
        .status_messages(client_id)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.message.message_id)
        .collect()
}

#[tokio::test]
async fn with_cmg_use_disabled_by_policy_only_intranet_mps_are_used() {
    let site = TestSite::start(cmg_store::testing::sqlite_store().await).await;
    let cmg = site.cmg(1).await;
    let admin = site.admin().await;
    let bulk = admin.new_bulk_token(Default::default()).await.unwrap();
    let setup = Setup::new(&[&cmg.ca_pem, site.root_pem()]);
    let (internet_only, both) = (
        [cmg.ca_pem.as_str()],
        [cmg.ca_pem.as_str(), site.root_pem()],
    );

    // A client that roams (intranet MP and CMG), and one that is always on the internet.
    let state = setup.state("roaming");
    let mut options = command_line(
        &site,
        &cmg,
        &setup,
        &state,
        bulk.token.expose(),
        &format!("SMSMP={}", site.mp_url()),
    );
    options.hardware_id = Some("hw-cmg-off".into());
    let report = cmg_client::install::install_with(&options, agent_options())
        .await
        .unwrap();
    assert_eq!(report.registered_via, "InternalNetwork");
    let always = setup.state("always");
    let mut options = command_line(
        &site,
        &cmg,
        &setup,
        &always,
        bulk.token.expose(),
        &format!("SMSMP={} CCMALWAYSINF=1", site.mp_url()),
    );
    options.hardware_id = Some("hw-cmg-off-always".into());
    cmg_client::install::install_with(&options, agent_options())
        .await
        .unwrap();

    // On the internet with CMG use enabled: the gateway.
    trust(&state, &internet_only);
    let cycle = Agent::open_with(&state, agent_options())
        .unwrap()
        .run_cycle_once()
        .await
        .unwrap();
    assert_eq!(cycle.connection.unwrap().as_str(), "Currently Internet");
    assert!(cycle.management_point.contains("/CCM_Proxy_MutualAuth/"));
    assert!(cmg_client::status(&state).unwrap().cmg_enabled);

    // The site disables CMG use. The policy that says so still arrives through the gateway;
    // from then on the gateway is not used, not even for what was queued.
    admin.set_setting("enable_cmg", "no").await.unwrap();
    site.settled().await;
    policy_due(&state);
    let mut agent = Agent::open_with(&state, agent_options()).unwrap();
    let queued = agent
        .queue_status(serde_json::json!({ "while": "cmg disabled" }))
        .unwrap();
    let error = agent.run_cycle_once().await.unwrap_err();
    assert!(
        matches!(
            error,
            AgentError::CmgDisabled {
                always_internet: false
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("enable_cmg = no"), "{error}");
    // Later cycles do not use the gateway either: not the MP list, not the CMG given at
    // install (CMGFQDNs); the message stays queued.
    let error = agent.run_cycle_once().await.unwrap_err();
    assert!(matches!(error, AgentError::CmgDisabled { .. }), "{error}");
    let status = cmg_client::status(&state).unwrap();
    assert!(!status.cmg_enabled);
    assert_eq!(status.connection_type, "Currently Internet");
    assert_eq!(status.current_management_point, None);
    assert!(status.queued_messages >= 1);
    assert!(
        status
            .action
            .as_deref()
            .is_some_and(|a| a.contains("internal network")),
        "{status}"
    );
    assert!(status.to_string().contains("Disabled by client policy"));
    assert!(!stored_ids(&site, &report.client_id).await.contains(&queued));
    let location = log(&state, "ClientLocation");
    assert!(
        location.contains(
            "CMG use is disabled by client policy (enable_cmg = no): only intranet management points are used"
        ),
        "{location}"
    );
    assert_eq!(
        location
            .matches("not using internet management points")
            .count(),
        1,
        "logged once, not every cycle: {location}"
    );

    // The always-internet client has nowhere to go.
    policy_due(&always);
    let error = Agent::open_with(&always, agent_options())
        .unwrap()
        .run_cycle_once()
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            AgentError::CmgDisabled {
                always_internet: true
            }
        ),
        "{error}"
    );
    let status = cmg_client::status(&always).unwrap();
    assert_eq!(status.connection_type, "Always Internet");
    assert_eq!(status.current_management_point, None);

    // Back on the intranet: the intranet MP is used, and the queued message arrives.
    trust(&state, &both);
    let cycle = Agent::open_with(&state, agent_options())
        .unwrap()
        .run_cycle_once()
        .await
        .unwrap();
    assert_eq!(cycle.connection.unwrap().as_str(), "Currently Intranet");
    assert_eq!(cycle.management_point, site.mp_url());
    assert!(stored_ids(&site, &report.client_id).await.contains(&queued));

    // The site enables CMG use again; the client learns it on the intranet…
    admin.set_setting("enable_cmg", "yes").await.unwrap();
    site.settled().await;
    policy_due(&state);
    let mut agent = Agent::open_with(&state, agent_options()).unwrap();
    let cycle = agent.run_cycle_once().await.unwrap();
    assert!(cycle.policy, "{cycle:?}");
    assert_eq!(cycle.connection.unwrap().as_str(), "Currently Intranet");
    assert!(cmg_client::status(&state).unwrap().cmg_enabled);
    assert!(
        log(&state, "ClientLocation").contains("CMG use is enabled by client policy"),
        "{}",
        log(&state, "ClientLocation")
    );

    // …and uses the gateway again once it is on the internet.
    trust(&state, &internet_only);
    let mut agent = Agent::open_with(&state, agent_options()).unwrap();
    let again = agent.queue_status(serde_json::json!({ "n": 2 })).unwrap();
    let cycle = agent.run_cycle_once().await.unwrap();
    assert_eq!(cycle.connection.unwrap().as_str(), "Currently Internet");
    assert!(cycle.management_point.contains("/CCM_Proxy_MutualAuth/"));
    assert!(stored_ids(&site, &report.client_id).await.contains(&again));
    let status = cmg_client::status(&state).unwrap();
    assert!(status.current_management_point.is_some() && status.action.is_none());
    cmg.shutdown().await;
    site.shutdown().await;
}
