//! The site server: creating a site (`cmg site init`, DESIGN §3.1), opening it with its keys
//! parsed once, and the admin service (DESIGN §1) through which every admin operation runs —
//! bulk registration tokens (§8), the site's certificates and its connection points for now.
//!
//! Front ends (the CLI today; the REST API and console later) only parse input and print what
//! the admin service returns: they hold no rules of their own. This crate must not print, parse
//! command lines or read environment variables; it owns no SQL (that is `cmg-store`) and no
//! cryptography (that is `cmg-pki` and `cmg-token`).

mod admin;
pub mod cmg;
mod connection_point;
mod error;
mod init;
mod layout;
pub mod mp;
mod server;
mod settings;
mod site;
mod state;

pub use admin::{
    AdminService, BulkTokenLifetime, InventoryItem, InventoryKind, ItemStatus, NewBulkToken,
};
pub use connection_point::{ConnectionPointInfo, ConnectionPointName, NewConnectionPoint};
pub use error::SiteError;
pub use init::{InitOptions, SiteCode, init_site};
pub use layout::{DataDir, SiteConfig};
pub use server::{CHANGE_POLL, DEFAULT_MP_LISTEN, SiteRunOptions, SiteServer};
pub use settings::{ApprovalMode, ConflictHandling, SiteSettings};
pub use site::{Site, SiteLogs};
pub use state::{SiteState, StateWatch, watch_state};

pub use cmg_pki::KeyAlgorithm;
pub use cmg_store::{
    AuditEntry, BulkTokenRecord, ConnectionPointRecord, DeviceConflict, DeviceRecord, MpRecord,
};

/// Seconds since the Unix epoch, the unit of every timestamp the site stores.
pub fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// `2026-11-28 12:40:00 UTC`: how the site shows a time to admins.
pub fn format_utc(unix: i64) -> String {
    let format =
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(format).ok())
        .unwrap_or_else(|| unix.to_string())
}
