//! `cmg client install` (ccmsetup) and `cmg client uninstall`.
//!
//! Install makes the key pair and self-signed certificate (or takes the PKI certificate),
//! derives the hardware ID, registers — with an intranet MP directly when one is given and
//! answers (and the client is not always on the internet), otherwise through the CMG with the
//! bulk registration token or the PKI certificate — stores the client token, and runs the
//! agent's start-up cycle once. If any step fails, what it created is removed again (the logs
//! stay, to say why) and the error names the reason. The bulk token is used for one request and
//! never written anywhere.

use std::path::{Path, PathBuf};

use cmg_log::ComponentLog;
use cmg_pki::KeyAlgorithm;
use cmg_proto::mp::{self, RegistrationRequest, RegistrationResponse};
use serde::Serialize;

use crate::agent::{Agent, AgentError, AgentOptions, hostname, os_name};
use crate::net::{self, Http, HttpConfig};
use crate::setup::{InstallOptions, SetupError};
use crate::state::{
    CERT_FILE, ClientState, ConnectionType, INSTALLED_FILES, KEY_FILE, LOG_DIR, STATE_FILE,
    TRUST_FILE, format_time, unix_now, write_atomic, write_secret,
};
use crate::{LocalError, RemoteError};

/// What a successful install did.
#[derive(Debug, Clone, Serialize)]
pub struct InstallReport {
    pub state_dir: PathBuf,
    pub client_id: String,
    /// `1` approved, `0` waiting for an admin.
    pub approval: u8,
    /// `InternalNetwork`, `BulkRegistration` or `PKI`.
    pub registered_via: String,
    /// The MP the client registered with.
    pub registered_with: String,
    pub connection: Option<ConnectionType>,
    pub token_expires: Option<i64>,
    /// The systemd unit written for `--service`.
    pub service_unit: Option<PathBuf>,
}

impl InstallReport {
    /// What to tell the admin: the client and how to keep the agent running.
    pub fn summary(&self) -> String {
        let dir = self.state_dir.display();
        let mut text = format!(
            "Client is registered. Server assigned ClientID is {} Approval status {}\nRegistered via {} with {}\n",
            self.client_id, self.approval, self.registered_via, self.registered_with
        );
        if let Some(connection) = self.connection {
            text.push_str(&format!("Connection type: {connection}\n"));
        }
        if let Some(exp) = self.token_expires {
            text.push_str(&format!("Client token valid until {}\n", format_time(exp)));
        }
        match &self.service_unit {
            Some(unit) => text.push_str(&format!(
                "Keep the agent running: systemctl enable --now {} (unit written to {})\n",
                unit.file_stem().map(|s| s.to_string_lossy()).unwrap_or_default(),
                unit.display()
            )),
            None => text.push_str(&format!(
                "Keep the agent running: cmg client run --state-dir {dir} (or install again with --service FILE for a systemd unit)\n"
            )),
        }
        text
    }
}

/// Why an install failed. When it fails, nothing stays installed (the logs stay).
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error(
        "a client is already installed in {0}: run `cmg client uninstall --state-dir {0}` first, or give another --state-dir"
    )]
    AlreadyInstalled(String),
    #[error("local error: {0}")]
    Local(#[from] LocalError),
    #[error("{0}")]
    Certificate(String),
    #[error("cannot determine the hardware ID: {0}")]
    HardwareId(String),
    #[error("registration with {mp} failed: {source}")]
    Registration {
        mp: String,
        #[source]
        source: Box<RemoteError>,
    },
    #[error(
        "the registration with {mp} is waiting for approval by the site admin (client {client_id}); nothing is left installed: approve the device in the site (admin CLI or console), then run the install again (the same machine keeps its client ID)"
    )]
    Pending { mp: String, client_id: String },
    #[error("the client registered, but its first cycle failed: {0}")]
    StartupCycle(#[source] Box<AgentError>),
    #[error("no client is installed in {0}")]
    NotInstalled(String),
}

impl InstallError {
    /// The server's error code behind a failed registration or first cycle, if any.
    pub fn server_code(&self) -> Option<&str> {
        match self {
            InstallError::Registration { source, .. } => source.code(),
            InstallError::StartupCycle(e) => match e.as_ref() {
                AgentError::Remote(remote) => remote.code(),
                _ => None,
            },
            _ => None,
        }
    }
}

/// ccmsetup: see the module documentation.
pub async fn install(options: &InstallOptions) -> Result<InstallReport, InstallError> {
    install_with(options, AgentOptions::default()).await
}

/// As [`install`], with the agent's time-outs (tests).
pub async fn install_with(
    options: &InstallOptions,
    agent_options: AgentOptions,
) -> Result<InstallReport, InstallError> {
    let dir = &options.state_dir;
    if dir.join(STATE_FILE).exists() {
        return Err(InstallError::AlreadyInstalled(dir.display().to_string()));
    }
    // Everything read from elsewhere is read before anything is created.
    let roots = read_roots(options)?;
    let pki = read_pki(options)?;
    let hardware_id = match &options.hardware_id {
        Some(id) => id.clone(),
        None => hardware_id(&options.site_code)?,
    };

    let created_dir = !dir.exists();
    std::fs::create_dir_all(dir).map_err(|e| LocalError::io("create", dir, e))?;
    #[cfg(unix)]
    if created_dir {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    }
    let log = ComponentLog::open(&dir.join(LOG_DIR), "ccmsetup")
        .map_err(|e| LocalError::io("open log in", &dir.join(LOG_DIR), e))?;
    log.info(&format!(
        "==========[ ccmsetup started, agent {} ]==========",
        crate::AGENT_VERSION
    ));
    log.info(&format!("Command line: {}", describe(options)));

    let result = run_install(options, roots, pki, hardware_id, agent_options, &log).await;
    match result {
        Ok(report) => {
            log.info(&format!(
                "Client {} is installed in {}",
                report.client_id,
                dir.display()
            ));
            log.info("CcmSetup is exiting with return code 0");
            Ok(report)
        }
        Err(e) => {
            remove_installed_files(dir);
            log.error(&format!("{e}"));
            log.error("Removed the files this install created; nothing is left installed.");
            log.error("CcmSetup is exiting with return code 1");
            Err(e)
        }
    }
}

async fn run_install(
    options: &InstallOptions,
    roots: Option<String>,
    pki: Option<(String, String)>,
    hardware_id: String,
    agent_options: AgentOptions,
    log: &ComponentLog,
) -> Result<InstallReport, InstallError> {
    let dir = &options.state_dir;
    let (cert_pem, key_pem) = match pki {
        Some(pair) => {
            log.info("Using the PKI client certificate given with /UsePKICert");
            pair
        }
        None => {
            let credential = cmg_pki::self_signed_device(&hostname(), KeyAlgorithm::EcdsaP256)
                .map_err(|e| {
                    InstallError::Certificate(format!("cannot create the client certificate: {e}"))
                })?;
            log.info(&format!(
                "Created a self-signed client certificate, SHA-256 thumbprint {}",
                cmg_pki::thumbprint_sha256(credential.cert_der())
            ));
            (
                credential.cert_pem().to_owned(),
                credential.key_pem().to_owned(),
            )
        }
    };
    write_secret(&dir.join(KEY_FILE), key_pem.as_bytes())?;
    write_atomic(&dir.join(CERT_FILE), cert_pem.as_bytes())?;
    if let Some(roots) = &roots {
        write_atomic(&dir.join(TRUST_FILE), roots.as_bytes())?;
    }
    log.info(&format!("Hardware ID: {hardware_id}"));

    let identity = format!("{key_pem}{cert_pem}");
    let http = Http::build(&HttpConfig {
        identity_pem: identity.as_bytes(),
        roots_pem: roots.as_deref(),
        resolve: &options.resolve,
        timeout: agent_options.request_timeout,
    })
    .map_err(InstallError::Certificate)?;
    let request = RegistrationRequest {
        hardware_id: hardware_id.clone(),
        hostname: hostname(),
        os: os_name(),
        agent_version: crate::AGENT_VERSION.into(),
    };

    let (answer, via, registered_with) = register(options, &http, &request, log).await?;

    let state = ClientState {
        client_id: answer.client_id.clone(),
        site_code: options.site_code.clone(),
        hardware_id,
        approval: u8::from(answer.approval),
        registered_via: via.to_owned(),
        always_internet: options.always_internet,
        use_pki_cert: options.use_pki_cert,
        custom_trust: roots.is_some(),
        intranet_mp: options.intranet_url().map(str::to_owned),
        cmg_fqdns: options
            .gateway_url()
            .map(str::to_owned)
            .into_iter()
            .collect(),
        resolve: options.resolve.clone(),
        management_points: Vec::new(),
        current_internet_mp: None,
        connection: None,
        current_mp: None,
        token_obtained: None,
        token_expires: None,
        policy: None,
        last_policy: None,
        last_location: None,
        last_fallback_check: None,
        last_renewal: None,
        last_heartbeat: None,
        last_error: None,
        reregistration_needed: false,
        installed_at: unix_now(),
    };
    state.save(dir)?;
    let mut agent = Agent::open_with(dir, agent_options)
        .map_err(|e| InstallError::StartupCycle(Box::new(e)))?;
    match agent.accept_registration(answer, via) {
        Ok(()) => {}
        Err(AgentError::ApprovalPending { client_id }) => {
            return Err(InstallError::Pending {
                mp: registered_with,
                client_id,
            });
        }
        Err(e) => return Err(InstallError::StartupCycle(Box::new(e))),
    }
    agent.mark_fresh_token();
    log.info("Running the agent's start-up cycle: location request, policy, first heartbeat");
    let cycle = agent
        .run_cycle_once()
        .await
        .map_err(|e| InstallError::StartupCycle(Box::new(e)))?;
    log.info(&format!(
        "Start-up cycle done: connection type {}, management point {}, {} message(s) delivered",
        cycle.connection.map_or("unknown", ConnectionType::as_str),
        cycle.management_point,
        cycle.delivered
    ));

    let service_unit = match &options.service {
        Some(path) => {
            write_unit(path, dir)?;
            log.info(&format!("Wrote the systemd unit {}", path.display()));
            Some(path.clone())
        }
        None => None,
    };
    let state = agent.state();
    Ok(InstallReport {
        state_dir: dir.clone(),
        client_id: state.client_id.clone(),
        approval: state.approval,
        registered_via: state.registered_via.clone(),
        registered_with,
        connection: state.connection,
        token_expires: state.token_expires,
        service_unit,
    })
}

/// Intranet MP first (unless always on the internet), then the CMG.
async fn register(
    options: &InstallOptions,
    http: &Http,
    request: &RegistrationRequest,
    log: &ComponentLog,
) -> Result<(RegistrationResponse, &'static str, String), InstallError> {
    let gateway = options.gateway_url();
    if let Some(intranet) = options.intranet_url().filter(|_| !options.always_internet) {
        let url = http.url(intranet, mp::REGISTRATION);
        log.info(&format!(
            "Registering with the intranet management point {url}"
        ));
        match net::call::<RegistrationResponse>(&url, http.post(&url).json(request)).await {
            Ok(answer) => return Ok((answer, "InternalNetwork", http.url(intranet, ""))),
            Err(e) if gateway.is_some() && e.is_transient() => {
                log.warn(&format!(
                    "The intranet management point does not answer ({e}); registering through the CMG"
                ));
            }
            Err(source) => {
                return Err(InstallError::Registration {
                    mp: http.url(intranet, ""),
                    source: Box::new(source),
                });
            }
        }
    }
    let Some(gateway) = gateway else {
        // Parsing guarantees an intranet MP or a CMG.
        return Err(InstallError::Setup(SetupError::Missing {
            property: "CCMHOSTNAME".into(),
            fix: "give the CMG: CCMHOSTNAME=<CMG>/CCM_Proxy_MutualAuth/<id>".into(),
        }));
    };
    let url = http.url(gateway, mp::REGISTRATION);
    let (builder, via) = if options.use_pki_cert {
        log.info(&format!(
            "Registering through the CMG {url} with the PKI certificate"
        ));
        (http.post(&url).json(request), "PKI")
    } else {
        let Some(token) = &options.regtoken else {
            return Err(InstallError::Setup(SetupError::Missing {
                property: "/regtoken".into(),
                fix: "registering through a CMG needs /regtoken:<token> or /UsePKICert".into(),
            }));
        };
        log.info(&format!(
            "Registering through the CMG {url} with the bulk registration token"
        ));
        (
            http.post(&url).json(request).bearer_auth(token.expose()),
            "BulkRegistration",
        )
    };
    let answer = net::call::<RegistrationResponse>(&url, builder)
        .await
        .map_err(|source| InstallError::Registration {
            mp: http.url(gateway, ""),
            source: Box::new(source),
        })?;
    Ok((answer, via, http.url(gateway, "")))
}

/// The command line as the log may show it: the token redacted.
fn describe(options: &InstallOptions) -> String {
    let mut parts = Vec::new();
    if let Some(mp) = &options.mp {
        parts.push(format!("/mp:{mp}"));
    }
    if let Some(cmg) = &options.cmg_url {
        parts.push(format!(
            "CCMHOSTNAME={}",
            cmg.strip_prefix("https://").unwrap_or(cmg)
        ));
    }
    parts.push(format!("SMSSiteCode={}", options.site_code));
    if let Some(mp) = &options.intranet_mp {
        parts.push(format!("SMSMP={mp}"));
    }
    if options.regtoken.is_some() {
        parts.push("/regtoken:<redacted>".into());
    }
    if options.always_internet {
        parts.push("CCMALWAYSINF=1".into());
    }
    if options.no_crl_check {
        parts.push("/NoCRLCheck".into());
    }
    if options.use_pki_cert {
        parts.push("/UsePKICert".into());
    }
    parts.join(" ")
}

fn read_roots(options: &InstallOptions) -> Result<Option<String>, InstallError> {
    if options.trust_ca.is_empty() {
        return Ok(None);
    }
    let mut pem = String::new();
    for path in &options.trust_ca {
        let text = std::fs::read_to_string(path).map_err(|e| SetupError::File {
            property: "--trust-ca".into(),
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        cmg_pki::pem_to_der(&text, "--trust-ca").map_err(|e| {
            InstallError::Certificate(format!(
                "--trust-ca {}: {e}; give the PEM root certificate of the CMG's server certificate",
                path.display()
            ))
        })?;
        pem.push_str(text.trim_end());
        pem.push('\n');
    }
    Ok(Some(pem))
}

fn read_pki(options: &InstallOptions) -> Result<Option<(String, String)>, InstallError> {
    let (Some(cert), Some(key)) = (&options.pki_cert, &options.pki_key) else {
        return Ok(None);
    };
    if !options.use_pki_cert {
        return Ok(None);
    }
    let read = |property: &str, path: &Path| {
        std::fs::read_to_string(path).map_err(|e| SetupError::File {
            property: property.into(),
            path: path.display().to_string(),
            reason: e.to_string(),
        })
    };
    let (cert_pem, key_pem) = (read("--pki-cert", cert)?, read("--pki-key", key)?);
    cmg_pki::pem_to_der(&cert_pem, "--pki-cert")
        .map_err(|e| InstallError::Certificate(format!("{e}; give the PEM client certificate")))?;
    cmg_pki::key_pem_to_pkcs8(&key_pem, "--pki-key").map_err(|e| {
        InstallError::Certificate(format!(
            "{e}; give the certificate's private key as PKCS#8 PEM"
        ))
    })?;
    Ok(Some((cert_pem, key_pem)))
}

/// SHA-256 (hex, upper case) of the SMBIOS system UUID — or, where it cannot be read, the OS
/// machine ID — together with the site code: stable across reinstalls (DESIGN §7).
pub fn hardware_id(site_code: &str) -> Result<String, InstallError> {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .ok()
            .map(|s| s.trim().to_ascii_lowercase())
            .filter(|s| {
                !s.is_empty()
                    && s.chars()
                        .any(|c| c.is_ascii_hexdigit() && c != '0' && c != 'f')
            })
    };
    let source = read("/sys/class/dmi/id/product_uuid")
        .map(|u| format!("smbios:{u}"))
        .or_else(|| read("/etc/machine-id").map(|m| format!("machine-id:{m}")))
        .ok_or_else(|| {
            InstallError::HardwareId(
                "neither /sys/class/dmi/id/product_uuid nor /etc/machine-id is readable; run as root or create /etc/machine-id (systemd-machine-id-setup)".into(),
            )
        })?;
    Ok(hash_hardware_id(&source, site_code))
}

fn hash_hardware_id(source: &str, site_code: &str) -> String {
    let digest = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        format!("{source}|{}", site_code.to_ascii_uppercase()).as_bytes(),
    );
    digest.as_ref().iter().map(|b| format!("{b:02X}")).collect()
}

fn write_unit(path: &Path, state_dir: &Path) -> Result<(), LocalError> {
    let exe = std::env::current_exe()
        .ok()
        .filter(|p| p.file_name().is_some_and(|n| n == "cmg"))
        .map_or_else(
            || "/usr/local/bin/cmg".to_owned(),
            |p| p.display().to_string(),
        );
    let dir = std::path::absolute(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
    let unit = format!(
        "[Unit]\nDescription=cmg client agent (ConfigMgr client over a cloud management gateway)\nAfter=network-online.target\nWants=network-online.target\n\n[Service]\nExecStart={exe} client run --state-dir {}\nRestart=always\nRestartSec=30\n\n[Install]\nWantedBy=multi-user.target\n",
        dir.display()
    );
    write_atomic(path, unit.as_bytes())
}

fn remove_installed_files(dir: &Path) {
    for name in INSTALLED_FILES {
        let path = dir.join(name);
        let _ = std::fs::remove_file(&path);
        let mut tmp = path.into_os_string();
        tmp.push(".tmp");
        let _ = std::fs::remove_file(PathBuf::from(tmp));
    }
}

/// Removes what install created in `state_dir` (keys, token, state, queue, logs) and the
/// directory itself when nothing else is left in it.
pub fn uninstall(state_dir: &Path) -> Result<(), InstallError> {
    if !state_dir.join(STATE_FILE).exists() && !state_dir.join(LOG_DIR).exists() {
        return Err(InstallError::NotInstalled(state_dir.display().to_string()));
    }
    remove_installed_files(state_dir);
    let logs = state_dir.join(LOG_DIR);
    if logs.exists() {
        std::fs::remove_dir_all(&logs).map_err(|e| LocalError::io("remove", &logs, e))?;
    }
    // Only succeeds when the directory is empty: anything else in it is not ours.
    let _ = std::fs::remove_dir(state_dir);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hardware_id_depends_on_machine_and_site() {
        let a = hash_hardware_id("smbios:4c4c4544", "ABC");
        assert_eq!(a, hash_hardware_id("smbios:4c4c4544", "abc"));
        assert_ne!(a, hash_hardware_id("smbios:4c4c4544", "XYZ"));
        assert_ne!(a, hash_hardware_id("machine-id:4c4c4544", "ABC"));
        assert_eq!(a.len(), 64);
    }
}
