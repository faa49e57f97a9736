//! The cmg client (DESIGN §7): `cmg client install` (the ccmsetup command line, key pair and
//! self-signed certificate, registration on the intranet or through a CMG, the agent's first
//! cycle), the agent behind `cmg client run` (connection type, location, token renewal, policy,
//! the on-disk status message queue), `cmg client status` and `cmg client uninstall`.
//!
//! This crate owns the device side only: its state directory and its logs (`ccmsetup.log`,
//! `ClientIDManagerStartup.log`, `ClientLocation.log`, `CcmMessaging.log`, `PolicyAgent.log`).
//! It must not sign or verify tokens, touch the site's database, or parse command lines other
//! than ccmsetup's; it must never write the bulk registration token anywhere, nor put a token in
//! a log, an error or `Debug` output.

use std::path::{Path, PathBuf};

pub mod agent;
pub mod install;
mod net;
pub mod queue;
pub mod setup;
pub mod state;
pub mod status;

pub use agent::{Agent, AgentError, AgentOptions, CycleReport};
/// The kind of a queued message ([`queue::enqueue`]).
pub use cmg_proto::mp::MessageKind;
pub use install::{InstallError, InstallReport, install, uninstall};
pub use setup::{BulkToken, InstallOptions, SetupError};
pub use state::{ClientState, ConnectionType};
pub use status::{ClientStatus, MpStatus, status};

/// Agent version reported at registration.
pub const AGENT_VERSION: &str = concat!("cmg-client ", env!("CARGO_PKG_VERSION"));

/// A failure on this machine (files), as opposed to an answer from a server.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {reason}")]
    Write { path: PathBuf, reason: String },
    #[error("{path} is damaged ({reason}); run `cmg client uninstall` and install again")]
    Corrupt { path: PathBuf, reason: String },
}

impl LocalError {
    pub(crate) fn io(action: &'static str, path: &Path, source: std::io::Error) -> LocalError {
        LocalError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// A failure talking to a management point or a gateway.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RemoteError {
    /// The server refused, with its error code (`CMGService_Token_Expired`, `Token_Blocked`, …).
    #[error("{url} refused the request (HTTP {status}, {code}): {message}; what to do: {action}")]
    Server {
        url: String,
        status: u16,
        code: String,
        message: String,
        action: String,
    },
    #[error(
        "{url} answered HTTP {status} without an explanation; check that it is a cmg management point or CMG"
    )]
    Http { url: String, status: u16 },
    #[error(
        "cannot reach {url}: {reason}; check the network, the name, and the trusted roots (--trust-ca)"
    )]
    Unreachable { url: String, reason: String },
    #[error("{url} answered something this client does not understand: {reason}")]
    BadAnswer { url: String, reason: String },
}

impl RemoteError {
    /// The server's error code, if it gave one.
    pub fn code(&self) -> Option<&str> {
        match self {
            RemoteError::Server { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The client token expired (the MP's `Token_Expired` or the gateway's
    /// `CMGService_Token_Expired`): only an intranet MP can register the client again.
    pub fn is_token_expired(&self) -> bool {
        matches!(
            self.code(),
            Some("Token_Expired" | "CMGService_Token_Expired")
        )
    }

    /// Worth trying again later (the network, a gateway without a tunnel, a busy server).
    pub fn is_transient(&self) -> bool {
        match self {
            RemoteError::Unreachable { .. } => true,
            RemoteError::Server { status, .. } | RemoteError::Http { status, .. } => {
                *status >= 500 || *status == 429
            }
            RemoteError::BadAnswer { .. } => false,
        }
    }
}
