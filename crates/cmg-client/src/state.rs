//! The client's state directory (DESIGN §7): key (0600), certificate, client token (0600),
//! `state.json` (settings, MP candidates, times), the status message queue and the logs.
//! Every rewrite goes to a temporary file that is synced and renamed into place.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cmg_proto::mp::{ClientPolicy, MpCandidate};
use serde::{Deserialize, Serialize};

use crate::LocalError;

pub const STATE_FILE: &str = "state.json";
pub const KEY_FILE: &str = "client.key";
pub const CERT_FILE: &str = "client.crt";
pub const TOKEN_FILE: &str = "client.token";
pub const TRUST_FILE: &str = "trusted-roots.pem";
pub const QUEUE_FILE: &str = "outbox.jsonl";
/// Held (advisory lock) while the queue is appended to or rewritten, so that another process
/// queueing a message while the agent removes delivered ones loses nothing.
pub const QUEUE_LOCK_FILE: &str = "outbox.lock";
pub const LOG_DIR: &str = "logs";

/// Every file `install` may create in the state directory (logs aside).
pub(crate) const INSTALLED_FILES: [&str; 7] = [
    STATE_FILE,
    KEY_FILE,
    CERT_FILE,
    TOKEN_FILE,
    TRUST_FILE,
    QUEUE_FILE,
    QUEUE_LOCK_FILE,
];

/// How the client reaches its site, as ConfigMgr's control panel names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConnectionType {
    #[serde(rename = "Currently Intranet")]
    CurrentlyIntranet,
    #[serde(rename = "Currently Internet")]
    CurrentlyInternet,
    #[serde(rename = "Always Internet")]
    AlwaysInternet,
}

impl ConnectionType {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionType::CurrentlyIntranet => "Currently Intranet",
            ConnectionType::CurrentlyInternet => "Currently Internet",
            ConnectionType::AlwaysInternet => "Always Internet",
        }
    }

    pub fn is_internet(self) -> bool {
        self != ConnectionType::CurrentlyIntranet
    }
}

impl std::fmt::Display for ConnectionType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `state.json`. Holds no secret: the client token lives in its own 0600 file and the bulk
/// registration token is never written anywhere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientState {
    pub client_id: String,
    pub site_code: String,
    pub hardware_id: String,
    /// `1` approved, `0` waiting for an admin.
    pub approval: u8,
    /// `InternalNetwork`, `BulkRegistration` or `PKI`.
    pub registered_via: String,
    pub always_internet: bool,
    pub use_pki_cert: bool,
    /// True when `trusted-roots.pem` replaces the system's roots.
    pub custom_trust: bool,
    /// The intranet MP given at install (`SMSMP` or an intranet `/mp:`).
    pub intranet_mp: Option<String>,
    /// The CMG URLs given at install (`CCMHOSTNAME`, a CMG `/mp:`): the `CMGFQDNs` fallback.
    pub cmg_fqdns: Vec<String>,
    /// Host name overrides (`--resolve`).
    #[serde(default)]
    pub resolve: Vec<(String, SocketAddr)>,
    /// The last location answer.
    #[serde(default)]
    pub management_points: Vec<MpCandidate>,
    /// The internet MP in use, as the location answer named it.
    pub current_internet_mp: Option<String>,
    pub connection: Option<ConnectionType>,
    /// The MP the last cycle used.
    pub current_mp: Option<String>,
    pub token_obtained: Option<i64>,
    pub token_expires: Option<i64>,
    pub policy: Option<ClientPolicy>,
    pub last_policy: Option<i64>,
    pub last_location: Option<i64>,
    pub last_fallback_check: Option<i64>,
    pub last_renewal: Option<i64>,
    pub last_heartbeat: Option<i64>,
    pub last_error: Option<String>,
    /// The client token expired: only an intranet MP can register this client again.
    pub reregistration_needed: bool,
    pub installed_at: i64,
}

impl ClientState {
    pub fn load(dir: &Path) -> Result<ClientState, LocalError> {
        let path = dir.join(STATE_FILE);
        let text = std::fs::read(&path).map_err(|e| LocalError::io("read", &path, e))?;
        serde_json::from_slice(&text).map_err(|e| LocalError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })
    }

    pub fn save(&self, dir: &Path) -> Result<(), LocalError> {
        let path = dir.join(STATE_FILE);
        let json = serde_json::to_vec_pretty(self).map_err(|e| LocalError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_atomic(&path, &json)
    }
}

/// Writes `contents` to `path` through a synced temporary file and a rename.
pub(crate) fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), LocalError> {
    let tmp = tmp_path(path);
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        LocalError::io("write", path, e)
    })
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Writes a secret (the client token, a key) with mode 0600, atomically.
pub(crate) fn write_secret(path: &Path, contents: &[u8]) -> Result<(), LocalError> {
    cmg_pki::write_private_file(path, contents).map_err(|e| LocalError::Write {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

pub(crate) fn read_text(path: &Path) -> Result<String, LocalError> {
    std::fs::read_to_string(path).map_err(|e| LocalError::io("read", path, e))
}

pub(crate) fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// `2026-11-25 09:05:03 UTC`.
pub fn format_time(unix: i64) -> String {
    let format =
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| unix.to_string())
}
