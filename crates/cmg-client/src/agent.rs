//! The agent (`cmg client run`, ConfigMgr's ccmexec; DESIGN §7). Each cycle it decides the
//! connection type (Always Internet, Currently Intranet when an intranet MP answers, else
//! Currently Internet), registers again on the intranet when its token expired, renews the token
//! at start and when older than the policy's renewal interval, refreshes the MP list at start
//! and every location interval, polls policy, and delivers the queued status messages and
//! heartbeats in order. Failures back off with jitter, up to [`AgentOptions::max_backoff`].
//!
//! When policy says CMG use is disabled (the site's `enable_cmg = no`), internet management
//! points — the cloud management gateway — are not used at all: the client works with intranet
//! management points only, and waits for one while none answers (it learns that CMG use is
//! enabled again from an intranet management point).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cmg_log::ComponentLog;
use cmg_proto::mp::{
    self, Approval, ClientPolicy, MessageKind, MpKind, MpList, RegistrationRequest,
    RegistrationResponse, RenewalResponse, StatusAck, StatusBatch,
};

use crate::net::{self, Http, HttpConfig};
use crate::state::{
    CERT_FILE, ClientState, ConnectionType, KEY_FILE, LOG_DIR, TOKEN_FILE, TRUST_FILE, format_time,
    read_text, unix_now, write_secret,
};
use crate::{LocalError, RemoteError, queue};

/// ConfigMgr's defaults, used until the first policy arrives (DESIGN §2).
pub const DEFAULT_POLICY: ClientPolicy = ClientPolicy {
    enable_cmg: true,
    policy_interval_secs: 60 * 60,
    location_interval_secs: 24 * 60 * 60,
    token_renewal_secs: 30 * 24 * 60 * 60,
    token_validity_secs: 90 * 24 * 60 * 60,
};

/// The `CMGFQDNs` check: every 25 h while no internet MP is known.
pub const FALLBACK_INTERVAL_SECS: i64 = 25 * 60 * 60;

/// The documented capabilities of an HTTPS management point, as `ClientLocation.log` shows them.
pub const SSL_CAPABILITIES: &str =
    "<Capabilities SchemaVersion =\"1.0\"><Property Name=\"SSL\" Version=\"1\" /></Capabilities>";

/// At most this many messages per `ccm_system/request` batch.
const BATCH: usize = 200;

/// While idle, the queue is looked at this often: a message queued by another component is
/// sent within about this long, not at the next piece of scheduled work.
const QUEUE_CHECK: Duration = Duration::from_secs(1);

/// Timing of the agent. Intervals of the work itself come from policy (the site's settings).
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Time-out of one request.
    pub request_timeout: Duration,
    /// Time-out of the "does an intranet MP answer" probe.
    pub probe_timeout: Duration,
    /// First wait after a failure; doubles per failure, with jitter.
    pub min_backoff: Duration,
    /// Longest wait after failures.
    pub max_backoff: Duration,
    /// Longest sleep between cycles. (A newly queued message ends the sleep early.)
    pub max_idle: Duration,
    /// A heartbeat is queued at start and this often.
    pub heartbeat_interval: Duration,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            request_timeout: Duration::from_secs(30),
            probe_timeout: Duration::from_secs(5),
            min_backoff: Duration::from_secs(5),
            max_backoff: Duration::from_secs(300),
            max_idle: Duration::from_secs(60),
            heartbeat_interval: Duration::from_secs(24 * 60 * 60),
        }
    }
}

/// Why a cycle failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the client is not installed in {0}: run `cmg client install` (or give --state-dir)")]
    NotInstalled(PathBuf),
    #[error("local error: {0}")]
    Local(#[from] LocalError),
    #[error("{0}")]
    Setup(String),
    #[error("server error: {0}")]
    Remote(#[from] RemoteError),
    #[error(
        "the client token expired: the client must reach a management point on the internal network to register again (it does so by itself when one answers)"
    )]
    ReregistrationNeeded,
    #[error(
        "the registration is waiting for approval by the site admin (client {client_id}); the agent asks again on the intranet"
    )]
    ApprovalPending { client_id: String },
    #[error("no management point is reachable: {0}")]
    NoManagementPoint(String),
    /// Policy disables CMG use and no intranet MP answers.
    #[error(
        "CMG use is disabled by client policy (the site's enable_cmg = no) and no intranet management point answers: the client does not use the cloud management gateway; it waits for a management point on the internal network{}",
        if *always_internet { " (this client is always on the internet, CCMALWAYSINF=1, so it never uses an intranet management point: it stays unmanaged until it is reinstalled after CMG use is enabled again)" } else { "" }
    )]
    CmgDisabled { always_internet: bool },
}

impl AgentError {
    /// A state directory that cannot be read: running on would not help.
    fn is_fatal(&self) -> bool {
        matches!(self, AgentError::NotInstalled(_) | AgentError::Setup(_))
    }
}

/// What one cycle did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CycleReport {
    pub connection: Option<ConnectionType>,
    /// The MP used, as dialled.
    pub management_point: String,
    pub registered_again: bool,
    pub renewed: bool,
    pub located: bool,
    pub policy: bool,
    pub delivered: usize,
    pub queued: usize,
}

pub(crate) struct Logs {
    pub location: ComponentLog,
    pub messaging: ComponentLog,
    pub policy: ComponentLog,
    pub registration: ComponentLog,
}

impl Logs {
    pub fn open(dir: &Path) -> Result<Logs, LocalError> {
        let dir = dir.join(LOG_DIR);
        let open = |name: &str| {
            ComponentLog::open(&dir, name).map_err(|e| LocalError::io("open log in", &dir, e))
        };
        Ok(Logs {
            location: open("ClientLocation")?,
            messaging: open("CcmMessaging")?,
            policy: open("PolicyAgent")?,
            registration: open("ClientIDManagerStartup")?,
        })
    }
}

/// A client token. `Debug` never shows it.
#[derive(Clone)]
pub(crate) struct ClientToken(String);

impl std::fmt::Debug for ClientToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientToken(<redacted>)")
    }
}

pub struct Agent {
    dir: PathBuf,
    state: ClientState,
    token: Option<ClientToken>,
    http: Http,
    probe: Http,
    options: AgentOptions,
    logs: Logs,
    renewed_since_start: bool,
    located_since_start: bool,
    heartbeat_since_start: bool,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("dir", &self.dir)
            .field("client_id", &self.state.client_id)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Opens the installed client in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Agent, AgentError> {
        Self::open_with(state_dir, AgentOptions::default())
    }

    pub fn open_with(state_dir: &Path, options: AgentOptions) -> Result<Agent, AgentError> {
        let state = load_installed(state_dir)?;
        let identity = format!(
            "{}{}",
            read_text(&state_dir.join(KEY_FILE))?,
            read_text(&state_dir.join(CERT_FILE))?
        );
        let roots = if state.custom_trust {
            Some(read_text(&state_dir.join(TRUST_FILE))?)
        } else {
            None
        };
        let token = match std::fs::read_to_string(state_dir.join(TOKEN_FILE)) {
            Ok(t) if !t.trim().is_empty() => Some(ClientToken(t.trim().to_owned())),
            Ok(_) => None,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(LocalError::io("read", &state_dir.join(TOKEN_FILE), e).into()),
        };
        let build = |timeout| {
            Http::build(&HttpConfig {
                identity_pem: identity.as_bytes(),
                roots_pem: roots.as_deref(),
                resolve: &state.resolve,
                timeout,
            })
            .map_err(AgentError::Setup)
        };
        let http = build(options.request_timeout)?;
        let probe = build(options.probe_timeout)?;
        Ok(Agent {
            dir: state_dir.to_path_buf(),
            logs: Logs::open(state_dir)?,
            state,
            token,
            http,
            probe,
            options,
            renewed_since_start: false,
            located_since_start: false,
            heartbeat_since_start: false,
        })
    }

    pub fn state(&self) -> &ClientState {
        &self.state
    }

    pub fn state_dir(&self) -> &Path {
        &self.dir
    }

    /// Install just received a fresh token: no renewal needed in its start-up cycle.
    pub(crate) fn mark_fresh_token(&mut self) {
        self.renewed_since_start = true;
    }

    /// Queues a status message for delivery (in order, exactly once); returns its ID.
    pub fn queue_status(&self, body: serde_json::Value) -> Result<String, AgentError> {
        Ok(queue::enqueue(&self.dir, MessageKind::Status, body)?)
    }

    fn policy(&self) -> ClientPolicy {
        self.state.policy.clone().unwrap_or(DEFAULT_POLICY)
    }

    /// Runs the agent until `shutdown` completes.
    pub async fn run(
        state_dir: &Path,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), AgentError> {
        let mut agent = Agent::open(state_dir)?;
        agent.run_until(shutdown).await
    }

    /// Cycles until `shutdown` completes: after a success it sleeps until the next piece of work
    /// is due; after a failure it backs off with jitter.
    pub async fn run_until(
        &mut self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), AgentError> {
        tokio::pin!(shutdown);
        self.logs
            .messaging
            .info(&format!("Agent started for {}", self.state.client_id));
        let mut failures: u32 = 0;
        loop {
            let outcome = tokio::select! {
                () = &mut shutdown => break,
                outcome = self.run_cycle_once() => outcome,
            };
            let (wait, wake_on_queue) = match outcome {
                Ok(_) => {
                    failures = 0;
                    (self.next_due_in(), true)
                }
                Err(e) if e.is_fatal() => return Err(e),
                Err(_) => {
                    failures = failures.saturating_add(1);
                    let wait =
                        backoff(failures, self.options.min_backoff, self.options.max_backoff);
                    // After a failure the backoff holds, whatever is queued.
                    (wait, false)
                }
            };
            tokio::select! {
                () = &mut shutdown => break,
                () = self.idle(wait, wake_on_queue) => {}
            }
        }
        self.logs
            .messaging
            .info("Agent is stopping (shutdown requested)");
        self.state.save(&self.dir)?;
        Ok(())
    }

    /// Sleeps for `wait`; with `wake_on_queue`, ends early once a message is queued.
    async fn idle(&self, wait: Duration, wake_on_queue: bool) {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return;
            }
            if !wake_on_queue {
                tokio::time::sleep(left).await;
                return;
            }
            tokio::time::sleep(left.min(QUEUE_CHECK)).await;
            if queue::has_pending(&self.dir) {
                return;
            }
        }
    }

    /// Time until the next piece of work is due.
    fn next_due_in(&self) -> Duration {
        let now = unix_now();
        let policy = self.policy();
        let due = |last: Option<i64>, every: u64| {
            last.map_or(0, |t| {
                (t + i64::try_from(every).unwrap_or(i64::MAX / 2) - now).max(0)
            })
        };
        let mut next = [
            due(self.state.last_policy, policy.policy_interval_secs),
            due(self.state.last_location, policy.location_interval_secs),
            due(self.state.token_obtained, policy.token_renewal_secs),
            due(
                self.state.last_heartbeat,
                self.options.heartbeat_interval.as_secs(),
            ),
        ]
        .into_iter()
        .min()
        .unwrap_or(0);
        if queue::pending(&self.dir).is_ok_and(|q| !q.is_empty()) {
            next = next.min(1);
        }
        Duration::from_secs(u64::try_from(next).unwrap_or(0))
            .clamp(Duration::from_secs(1), self.options.max_idle)
    }

    /// One cycle; the state is saved whatever happens.
    pub async fn run_cycle_once(&mut self) -> Result<CycleReport, AgentError> {
        let mut report = CycleReport::default();
        let result = self.cycle(&mut report).await;
        match &result {
            Ok(()) => self.state.last_error = None,
            Err(e) => {
                if let AgentError::Remote(remote) = e
                    && remote.is_token_expired()
                {
                    self.token_expired();
                }
                self.state.last_error = Some(e.to_string());
                self.logs.messaging.error(&format!("Cycle failed: {e}"));
            }
        }
        self.state.save(&self.dir)?;
        result.map(|()| report)
    }

    fn token_expired(&mut self) {
        if !self.state.reregistration_needed {
            self.state.reregistration_needed = true;
            self.logs.registration.error(
                "[RegTask] - The client token expired. The client must reach a management point on the internal network to register again.",
            );
        }
    }

    async fn cycle(&mut self, report: &mut CycleReport) -> Result<(), AgentError> {
        let now = unix_now();
        if !self.heartbeat_since_start
            || self.state.last_heartbeat.is_none_or(|t| {
                now - t >= i64::try_from(self.options.heartbeat_interval.as_secs()).unwrap_or(0)
            })
        {
            queue::enqueue(
                &self.dir,
                MessageKind::Heartbeat,
                serde_json::json!({
                    "client_id": self.state.client_id,
                    "hostname": hostname(),
                    "agent_version": crate::AGENT_VERSION,
                }),
            )?;
            self.heartbeat_since_start = true;
            self.state.last_heartbeat = Some(now);
        }

        let (connection, base) = self.choose_mp().await?;
        report.connection = Some(connection);
        report.management_point = self.http.url(&base, "");
        if self.state.connection != Some(connection) {
            self.logs.location.info(&format!(
                "Client is on {} (connection type {connection})",
                if connection.is_internet() {
                    "the internet"
                } else {
                    "the intranet"
                }
            ));
        }
        self.state.connection = Some(connection);
        self.state.current_mp = Some(base.clone());

        if self.state.reregistration_needed || self.token.is_none() {
            if connection != ConnectionType::CurrentlyIntranet {
                if self.state.reregistration_needed {
                    self.logs.registration.warn(
                        "[RegTask] - The client token expired; waiting for a management point on the internal network to register again.",
                    );
                    return Err(AgentError::ReregistrationNeeded);
                }
                return Err(AgentError::ApprovalPending {
                    client_id: self.state.client_id.clone(),
                });
            }
            self.register_on_intranet(&base).await?;
            report.registered_again = true;
        }

        let policy = self.policy();
        let renewal_due = self.state.token_obtained.is_none_or(|t| {
            now - t >= i64::try_from(policy.token_renewal_secs).unwrap_or(i64::MAX)
        });
        if !self.renewed_since_start || renewal_due {
            self.renew(&base).await?;
            report.renewed = true;
        }

        let location_due = self.state.last_location.is_none_or(|t| {
            now - t >= i64::try_from(policy.location_interval_secs).unwrap_or(i64::MAX)
        });
        if !self.located_since_start || location_due {
            self.locate(&base, connection).await?;
            report.located = true;
        }

        let policy_due = self.state.last_policy.is_none_or(|t| {
            now - t >= i64::try_from(policy.policy_interval_secs).unwrap_or(i64::MAX)
        });
        if policy_due {
            self.poll_policy(&base).await?;
            report.policy = true;
            // Policy just disabled CMG use: stop using the gateway now, not next cycle.
            if connection.is_internet() && !self.policy().enable_cmg {
                return Err(self.cmg_disabled(connection));
            }
        }

        report.delivered = self.deliver(&base).await?;
        report.queued = queue::pending(&self.dir)?.len();
        Ok(())
    }

    fn bearer(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(ClientToken(t)) => request.bearer_auth(t),
            None => request,
        }
    }

    /// Always Internet: the internet MP. Otherwise the first intranet MP that answers, else the
    /// internet MP.
    async fn choose_mp(&mut self) -> Result<(ConnectionType, String), AgentError> {
        if !self.state.always_internet {
            let mut candidates: Vec<String> = self
                .state
                .management_points
                .iter()
                .filter(|m| m.kind == MpKind::Intranet)
                .map(|m| m.url.clone())
                .collect();
            if let Some(mp) = &self.state.intranet_mp
                && !candidates.iter().any(|c| c.eq_ignore_ascii_case(mp))
            {
                candidates.push(mp.clone());
            }
            for candidate in candidates {
                if self.answers(&candidate).await {
                    return Ok((ConnectionType::CurrentlyIntranet, candidate));
                }
            }
        }
        let connection = if self.state.always_internet {
            ConnectionType::AlwaysInternet
        } else {
            ConnectionType::CurrentlyInternet
        };
        if !self.policy().enable_cmg {
            return Err(self.cmg_disabled(connection));
        }
        Ok((connection, self.internet_mp()?))
    }

    /// On the internet while policy disables CMG use: no management point is used. Logged when
    /// the client gets into this state, not on every cycle.
    fn cmg_disabled(&mut self, connection: ConnectionType) -> AgentError {
        let changed = self.state.connection != Some(connection);
        if changed {
            self.logs.location.info(&format!(
                "Client is on the internet (connection type {connection})"
            ));
        }
        if changed || self.state.current_mp.is_some() {
            self.logs.location.warn(
                "CMG use is disabled by client policy (enable_cmg = no): not using internet management points; waiting for a management point on the internal network",
            );
        }
        self.state.connection = Some(connection);
        self.state.current_mp = None;
        AgentError::CmgDisabled {
            always_internet: self.state.always_internet,
        }
    }

    /// An intranet MP answers its location request (over TLS the client trusts).
    async fn answers(&self, base: &str) -> bool {
        let url = format!("{}?MPLIST", self.probe.url(base, mp::LOCATION));
        net::call::<MpList>(&url, self.probe.get(&url))
            .await
            .is_ok()
    }

    /// The internet MP from the MP list; without one, the CMG given at install (`CMGFQDNs`),
    /// tried at first and then every 25 hours.
    fn internet_mp(&mut self) -> Result<String, AgentError> {
        let listed = self
            .state
            .management_points
            .iter()
            .find(|m| m.kind == MpKind::Internet)
            .map(|m| m.url.clone());
        let url = match listed {
            Some(url) => url,
            None => {
                let now = unix_now();
                let Some(fallback) = self.state.cmg_fqdns.first().cloned() else {
                    return Err(AgentError::NoManagementPoint(
                        "no intranet management point answers and no CMG is known; connect to the internal network".into(),
                    ));
                };
                let due = self.state.last_location.is_none()
                    || self
                        .state
                        .last_fallback_check
                        .is_none_or(|t| now - t >= FALLBACK_INTERVAL_SECS);
                if !due {
                    let next = self
                        .state
                        .last_fallback_check
                        .map_or(now, |t| t + FALLBACK_INTERVAL_SECS);
                    return Err(AgentError::NoManagementPoint(format!(
                        "no intranet management point answers, the site lists no internet management point, and the next check of the CMG given at install (CMGFQDNs) is at {}",
                        format_time(next)
                    )));
                }
                self.state.last_fallback_check = Some(now);
                self.logs.location.info(&format!(
                    "No internet management point is known; trying the CMG from the CMGFQDNs list: {fallback}"
                ));
                fallback
            }
        };
        let dialled = self.http.url(&url, "");
        let current = self
            .state
            .current_internet_mp
            .as_deref()
            .map(|c| self.http.url(c, ""));
        if current.as_deref() != Some(dialled.as_str()) {
            self.logs.location.info(&format!(
                "Rotating internet management point, new management point [1] is: {url} (0) with capabilities: {SSL_CAPABILITIES}"
            ));
            self.state.current_internet_mp = Some(url.clone());
        }
        Ok(url)
    }

    async fn register_on_intranet(&mut self, base: &str) -> Result<(), AgentError> {
        let url = self.http.url(base, mp::REGISTRATION);
        self.logs
            .registration
            .info(&format!("[RegTask] - Registering with {url}"));
        let request = RegistrationRequest {
            hardware_id: self.state.hardware_id.clone(),
            hostname: hostname(),
            os: os_name(),
            agent_version: crate::AGENT_VERSION.into(),
        };
        let answer: RegistrationResponse =
            net::call(&url, self.http.post(&url).json(&request)).await?;
        self.accept_registration(answer, "InternalNetwork")?;
        Ok(())
    }

    /// Stores a registration answer and logs the documented line.
    pub(crate) fn accept_registration(
        &mut self,
        answer: RegistrationResponse,
        via: &str,
    ) -> Result<(), AgentError> {
        let approval = u8::from(answer.approval);
        self.logs.registration.info(&format!(
            "[RegTask] - Client is registered. Server assigned ClientID is {} Approval status {approval}",
            answer.client_id
        ));
        self.state.client_id = answer.client_id;
        self.state.approval = approval;
        self.state.registered_via = via.to_owned();
        if let Some(token) = answer.client_token {
            write_secret(&self.dir.join(TOKEN_FILE), token.as_bytes())?;
            self.token = Some(ClientToken(token));
            self.state.token_obtained = Some(unix_now());
            self.state.token_expires = answer.token_expires;
            self.state.reregistration_needed = false;
            self.renewed_since_start = true;
        } else if answer.approval == Approval::Pending {
            return Err(AgentError::ApprovalPending {
                client_id: self.state.client_id.clone(),
            });
        }
        Ok(())
    }

    async fn renew(&mut self, base: &str) -> Result<(), AgentError> {
        let url = self.http.url(base, mp::TOKEN_RENEWAL);
        let answer: RenewalResponse = net::call(&url, self.bearer(self.http.post(&url))).await?;
        write_secret(&self.dir.join(TOKEN_FILE), answer.client_token.as_bytes())?;
        self.token = Some(ClientToken(answer.client_token));
        let now = unix_now();
        self.state.token_obtained = Some(now);
        self.state.last_renewal = Some(now);
        self.state.token_expires = Some(answer.token_expires);
        self.renewed_since_start = true;
        self.logs.registration.info(&format!(
            "[RegTask] - Renewed the client token through {url}; it is valid until {}",
            format_time(answer.token_expires)
        ));
        Ok(())
    }

    async fn locate(&mut self, base: &str, connection: ConnectionType) -> Result<(), AgentError> {
        let url = format!("{}?MPLIST", self.http.url(base, mp::LOCATION));
        let answer: MpList = net::call(&url, self.bearer(self.http.get(&url))).await?;
        self.logs.location.info(&format!(
            "Management point list from {url}: {}",
            answer
                .management_points
                .iter()
                .map(|m| format!("{} ({:?})", m.url, m.kind))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        self.state.management_points = answer.management_points;
        self.state.last_location = Some(unix_now());
        self.located_since_start = true;
        if connection.is_internet()
            && self
                .state
                .management_points
                .iter()
                .any(|m| m.kind == MpKind::Internet)
        {
            // Logs the rotation when the list names another internet MP than the one in use.
            self.internet_mp()?;
        }
        Ok(())
    }

    async fn poll_policy(&mut self, base: &str) -> Result<(), AgentError> {
        let url = self.http.url(base, mp::POLICY);
        let policy: ClientPolicy = net::call(&url, self.bearer(self.http.get(&url))).await?;
        if self.policy().enable_cmg != policy.enable_cmg {
            if policy.enable_cmg {
                self.logs.location.info(
                    "CMG use is enabled by client policy: internet management points (the cloud management gateway) are used when no intranet management point answers",
                );
            } else {
                self.logs.location.warn(
                    "CMG use is disabled by client policy (enable_cmg = no): only intranet management points are used",
                );
            }
        }
        if self.state.policy.as_ref() != Some(&policy) {
            self.logs.policy.info(&format!(
                "Applied client settings from {url}: CMG use {}, policy every {} s, location every {} s, token renewal after {} s, token validity {} s",
                if policy.enable_cmg { "enabled" } else { "disabled" },
                policy.policy_interval_secs,
                policy.location_interval_secs,
                policy.token_renewal_secs,
                policy.token_validity_secs
            ));
        } else {
            self.logs
                .policy
                .info(&format!("Policy from {url} is unchanged"));
        }
        self.state.policy = Some(policy);
        self.state.last_policy = Some(unix_now());
        Ok(())
    }

    /// Sends the queue in order, a batch at a time; a batch leaves the queue only after a 200.
    async fn deliver(&mut self, base: &str) -> Result<usize, AgentError> {
        let url = self.http.url(base, mp::STATUS);
        let mut delivered = 0;
        loop {
            let pending = queue::pending(&self.dir)?;
            if pending.is_empty() {
                return Ok(delivered);
            }
            let batch: Vec<_> = pending.into_iter().take(BATCH).collect();
            let ids: Vec<String> = batch.iter().map(|m| m.id.clone()).collect();
            let body = StatusBatch { messages: batch };
            let ack: StatusAck = net::call(&url, self.bearer(self.http.post(&url).json(&body)))
                .await
                .inspect_err(|e| {
                    self.logs.messaging.warn(&format!(
                        "Could not send {} queued message(s); they stay queued: {e}",
                        ids.len()
                    ))
                })?;
            queue::remove(&self.dir, &ids)?;
            delivered += ids.len();
            self.logs.messaging.info(&format!(
                "Sent {} message(s) to {url}: {} accepted, {} already delivered",
                ids.len(),
                ack.accepted,
                ack.duplicates
            ));
        }
    }
}

/// The state of the client installed in `state_dir`.
pub(crate) fn load_installed(state_dir: &Path) -> Result<ClientState, AgentError> {
    match ClientState::load(state_dir) {
        Ok(state) => Ok(state),
        Err(LocalError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Err(AgentError::NotInstalled(state_dir.to_path_buf()))
        }
        Err(e) => Err(e.into()),
    }
}

/// `min · 2^(failures−1)`, capped at `max`, scaled by a random factor in [0.5, 1).
pub fn backoff(failures: u32, min: Duration, max: Duration) -> Duration {
    let exp = min.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let capped = exp.min(max);
    let mut byte = [0u8; 1];
    let factor = match aws_lc_rs::rand::fill(&mut byte) {
        Ok(()) => 0.5 + f64::from(byte[0]) / 512.0,
        Err(_) => 0.75,
    };
    capped.mul_f64(factor)
}

pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty() && !h.chars().any(char::is_control))
        .unwrap_or_else(|| "localhost".into())
}

pub(crate) fn os_name() -> String {
    std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_owned())
        })
        .filter(|v| !v.is_empty() && !v.chars().any(char::is_control))
        .unwrap_or_else(|| std::env::consts::OS.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let (min, max) = (Duration::from_secs(5), Duration::from_secs(300));
        for failures in 1..40 {
            let wait = backoff(failures, min, max);
            let ceiling = (min * 2u32.pow(failures.saturating_sub(1).min(16))).min(max);
            assert!(
                wait <= ceiling && wait >= ceiling / 2,
                "{failures}: {wait:?}"
            );
        }
    }
}
