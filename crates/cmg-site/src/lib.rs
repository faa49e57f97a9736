//! The site server: creating a site (`cmg site init`, DESIGN §3.1), opening it with its keys
//! parsed once, and the admin service (DESIGN §1) through which every admin operation runs —
//! bulk registration tokens (§8) and the site's certificates for now.
//!
//! Front ends (the CLI today; the REST API and console later) only parse input and print what
//! the admin service returns: they hold no rules of their own. This crate must not print, parse
//! command lines or read environment variables; it owns no SQL (that is `cmg-store`) and no
//! cryptography (that is `cmg-pki` and `cmg-token`).

mod admin;
mod error;
mod init;
mod layout;
mod site;
mod watch;

pub use admin::{
    AdminService, BulkTokenLifetime, InventoryItem, InventoryKind, ItemStatus, NewBulkToken,
};
pub use error::SiteError;
pub use init::{InitOptions, SiteCode, init_site};
pub use layout::{DataDir, SiteConfig};
pub use site::Site;
pub use watch::{RevocationWatch, watch_revocations};

pub use cmg_pki::KeyAlgorithm;
pub use cmg_store::{AuditEntry, BulkTokenRecord};

/// Seconds since the Unix epoch, the unit of every timestamp the site stores.
pub fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}
