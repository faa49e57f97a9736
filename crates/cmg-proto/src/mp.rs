//! Management point messages (DESIGN §5.2): JSON bodies of every endpoint, the same on the
//! intranet and through the gateway.

use serde::{Deserialize, Serialize};

/// `POST`: register a device.
pub const REGISTRATION: &str = "/MP_ClientRegistration";
/// `POST`: renew a client token.
pub const TOKEN_RENEWAL: &str = "/CCM_STS";
/// `GET` with query `MPLIST`: management point candidates.
pub const LOCATION: &str = "/SMS_MP/.sms_aut";
/// `GET`: the client settings that apply.
pub const POLICY: &str = "/SMS_MP/.sms_pol";
/// `POST`: batched status messages, heartbeat and inventory.
pub const STATUS: &str = "/ccm_system/request";
/// `GET`: the site's token verification keys.
pub const JWKS: &str = "/.well-known/jwks.json";

/// The endpoints a gateway may relay (the site's published URL map, DESIGN §5.1).
pub const GATEWAY_URL_MAP: [&str; 6] =
    [REGISTRATION, TOKEN_RENEWAL, LOCATION, POLICY, STATUS, JWKS];

/// What a device says about itself when it registers. Its certificate comes from TLS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrationRequest {
    /// Stable per machine (DESIGN §7): SMBIOS UUID or machine ID, hashed with the site code.
    pub hardware_id: String,
    pub hostname: String,
    pub os: String,
    pub agent_version: String,
}

/// Approval as ConfigMgr reports it: `1` approved, `0` waiting for an admin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "u8", try_from = "u8")]
pub enum Approval {
    Pending,
    Approved,
}

impl From<Approval> for u8 {
    fn from(a: Approval) -> u8 {
        match a {
            Approval::Pending => 0,
            Approval::Approved => 1,
        }
    }
}

impl TryFrom<u8> for Approval {
    type Error = String;
    fn try_from(v: u8) -> Result<Self, String> {
        match v {
            0 => Ok(Approval::Pending),
            1 => Ok(Approval::Approved),
            other => Err(format!("unknown approval status {other}")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrationResponse {
    /// `GUID:` + upper-case GUID.
    pub client_id: String,
    pub approval: Approval,
    /// Absent while approval is pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_token: Option<String>,
    /// Unix seconds; absent with the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_expires: Option<i64>,
}

/// `CCM_STS` answer: a fresh client token, bound to the same certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewalResponse {
    pub client_token: String,
    pub token_expires: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MpKind {
    Intranet,
    Internet,
}

/// One management point a device may use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MpCandidate {
    /// `https://mp.example/` for the intranet; `https://<CMG>/CCM_Proxy_MutualAuth/<role ID>`
    /// through a gateway.
    pub url: String,
    pub kind: MpKind,
    pub site_code: String,
    /// Capabilities, as ConfigMgr lists them; every cmg MP speaks HTTPS.
    pub ssl: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MpList {
    pub management_points: Vec<MpCandidate>,
}

/// The client settings a device follows (`.sms_pol`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientPolicy {
    /// "Enable clients to use a cloud management gateway".
    pub enable_cmg: bool,
    /// How often to poll policy.
    pub policy_interval_secs: u64,
    /// How often to refresh the management point list.
    pub location_interval_secs: u64,
    /// Renew the client token when it is older than this.
    pub token_renewal_secs: u64,
    /// How long a new client token is valid.
    pub token_validity_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessageKind {
    Heartbeat,
    Status,
    Inventory,
}

impl MessageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Heartbeat => "Heartbeat",
            MessageKind::Status => "Status",
            MessageKind::Inventory => "Inventory",
        }
    }
}

/// One status message, heartbeat or inventory report. `id` makes a retried batch harmless.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusMessage {
    pub id: String,
    pub kind: MessageKind,
    /// When the device produced it, Unix seconds.
    pub time: i64,
    #[serde(default)]
    pub body: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusBatch {
    pub messages: Vec<StatusMessage>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusAck {
    /// Stored now.
    pub accepted: u32,
    /// Already stored by an earlier delivery of the same message ID.
    pub duplicates: u32,
}

/// Every error response of the MP and the gateway (DESIGN §4): a stable code, what happened, and
/// what the device or its admin should do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    pub error: String,
    pub message: String,
    pub action: String,
}

/// Headers by which a connection point passes on the identity a gateway verified (DESIGN §6).
/// A management point believes them only on a connection authenticated with a connection point
/// certificate, and ignores them on every other.
pub mod relay {
    /// `Token`, `BulkRegistration` or `PKI`.
    pub const IDENTITY: &str = "x-cmg-identity";
    /// base64url SHA-256 of the device's certificate.
    pub const CLIENT_THUMBPRINT: &str = "x-cmg-client-thumbprint";
    /// Subject of a PKI client certificate.
    pub const PKI_SUBJECT: &str = "x-cmg-pki-subject";
    /// Name of the CMG the device came through.
    pub const GATEWAY: &str = "x-cmg-gateway";
}
