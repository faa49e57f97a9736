//! `cmg client status [--json]` (DESIGN §7): what the client knows about itself, read from its
//! state directory without contacting anyone.

use std::fmt;
use std::path::{Path, PathBuf};

use cmg_proto::mp::MpKind;
use serde::Serialize;

use crate::agent::{AgentError, DEFAULT_POLICY, load_installed};
use crate::queue;
use crate::state::{ConnectionType, format_time};

/// One management point the client may use.
#[derive(Debug, Clone, Serialize)]
pub struct MpStatus {
    pub url: String,
    /// `Intranet` or `Internet`.
    #[serde(rename = "type")]
    pub kind: String,
    pub site_code: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClientStatus {
    pub state_dir: PathBuf,
    pub client_id: String,
    pub site_code: String,
    /// `Approved` or `Pending`.
    pub approval: String,
    pub registered_via: String,
    /// `Currently Intranet`, `Currently Internet`, `Always Internet`, or `Unknown` before the
    /// first cycle.
    pub connection_type: String,
    /// Where the client is now: `Currently Intranet` or `Currently Internet` (an always-internet
    /// client is on the internet whatever happens), or `Unknown` before the first cycle.
    pub network: String,
    pub current_management_point: Option<String>,
    /// Whether policy lets this client use a cloud management gateway (the site's `enable_cmg`).
    /// When false, only intranet management points are used.
    pub cmg_enabled: bool,
    pub management_points: Vec<MpStatus>,
    /// Unix seconds, and the same as text.
    pub token_expires: Option<i64>,
    pub token_expires_utc: Option<String>,
    pub token_renewed: Option<i64>,
    pub last_policy: Option<i64>,
    pub last_policy_utc: Option<String>,
    pub last_location: Option<i64>,
    pub last_location_utc: Option<String>,
    pub policy_interval_secs: u64,
    pub location_interval_secs: u64,
    pub token_renewal_secs: u64,
    pub queued_messages: usize,
    pub reregistration_needed: bool,
    pub last_error: Option<String>,
    /// What the admin or the user should do, when something is wrong.
    pub action: Option<String>,
}

/// Reads the client's status from `state_dir`.
pub fn status(state_dir: &Path) -> Result<ClientStatus, AgentError> {
    let state = load_installed(state_dir)?;
    let queued = queue::pending(state_dir)?.len();
    let policy = state.policy.clone().unwrap_or(DEFAULT_POLICY);
    let connection_type = match state.connection {
        Some(c) => c.as_str().to_owned(),
        None if state.always_internet => "Always Internet".to_owned(),
        None => "Unknown".to_owned(),
    };
    let network = match state.connection {
        Some(ConnectionType::CurrentlyIntranet) => ConnectionType::CurrentlyIntranet.as_str(),
        Some(ConnectionType::CurrentlyInternet | ConnectionType::AlwaysInternet) => {
            ConnectionType::CurrentlyInternet.as_str()
        }
        None => "Unknown",
    }
    .to_owned();
    let action = if state.reregistration_needed {
        Some("the client token expired: connect the device to the internal network so that the client registers again with a management point there".to_owned())
    } else if state.approval == 0 {
        Some("approve the client in the site (`cmg admin device approve`)".to_owned())
    } else if !policy.enable_cmg && state.current_mp.is_none() {
        Some("CMG use is disabled by client policy (the site's enable_cmg = no): connect the device to the internal network; the client uses only intranet management points until the site enables CMG use again".to_owned())
    } else {
        state.last_error.as_ref().map(|_| {
            "the agent retries by itself; check the last error and the logs in the state directory".to_owned()
        })
    };
    Ok(ClientStatus {
        state_dir: state_dir.to_path_buf(),
        client_id: state.client_id,
        site_code: state.site_code,
        approval: if state.approval == 1 {
            "Approved"
        } else {
            "Pending"
        }
        .to_owned(),
        registered_via: state.registered_via,
        connection_type,
        network,
        current_management_point: state.current_mp,
        cmg_enabled: policy.enable_cmg,
        management_points: state
            .management_points
            .iter()
            .map(|m| MpStatus {
                url: m.url.clone(),
                kind: match m.kind {
                    MpKind::Intranet => "Intranet",
                    MpKind::Internet => "Internet",
                }
                .to_owned(),
                site_code: m.site_code.clone(),
            })
            .collect(),
        token_expires: state.token_expires,
        token_expires_utc: state.token_expires.map(format_time),
        token_renewed: state.last_renewal,
        last_policy: state.last_policy,
        last_policy_utc: state.last_policy.map(format_time),
        last_location: state.last_location,
        last_location_utc: state.last_location.map(format_time),
        policy_interval_secs: policy.policy_interval_secs,
        location_interval_secs: policy.location_interval_secs,
        token_renewal_secs: policy.token_renewal_secs,
        queued_messages: queued,
        reregistration_needed: state.reregistration_needed,
        last_error: state.last_error,
        action,
    })
}

impl fmt::Display for ClientStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let or_never = |v: &Option<String>| v.clone().unwrap_or_else(|| "never".into());
        writeln!(f, "Client ID:          {}", self.client_id)?;
        writeln!(f, "Site code:          {}", self.site_code)?;
        writeln!(f, "Approval:           {}", self.approval)?;
        writeln!(f, "Registered via:     {}", self.registered_via)?;
        writeln!(f, "Connection type:    {}", self.connection_type)?;
        writeln!(f, "Network:            {}", self.network)?;
        if let Some(mp) = &self.current_management_point {
            writeln!(f, "Management point:   {mp}")?;
        }
        writeln!(
            f,
            "CMG use:            {}",
            if self.cmg_enabled {
                "Enabled"
            } else {
                "Disabled by client policy"
            }
        )?;
        writeln!(f, "Management points:")?;
        if self.management_points.is_empty() {
            writeln!(f, "  (none known yet)")?;
        }
        for mp in &self.management_points {
            writeln!(f, "  {:<9} {}", mp.kind, mp.url)?;
        }
        writeln!(
            f,
            "Token valid until:  {}",
            or_never(&self.token_expires_utc)
        )?;
        writeln!(f, "Last policy:        {}", or_never(&self.last_policy_utc))?;
        writeln!(
            f,
            "Last location:      {}",
            or_never(&self.last_location_utc)
        )?;
        writeln!(f, "Queued messages:    {}", self.queued_messages)?;
        if self.reregistration_needed {
            writeln!(f, "Re-registration:    needed (the client token expired)")?;
        }
        if let Some(e) = &self.last_error {
            writeln!(f, "Last error:         {e}")?;
        }
        if let Some(a) = &self.action {
            writeln!(f, "What to do:         {a}")?;
        }
        Ok(())
    }
}
