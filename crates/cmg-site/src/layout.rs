//! Where a site keeps its files: one data directory (`--data`, default `./cmg-data`).
//!
//! ```text
//! site.toml                       site code, hierarchy ID, database URL (0600: it may hold a password)
//! site.db                         the embedded SQLite database (when no --db was given)
//! pki/site-root.{crt,key}         site issuing root ("SMS Issuing")
//! pki/token-signing-<kid>.{crt,key}  token signing certificates, one pair per key (rotation)
//! pki/mp.{crt,key}                management point TLS ("SMS Role SSL Certificate")
//! pki/connection-point.{crt,key}  connection point tunnel certificate
//! logs/                           the site's log files
//! ```
//! Every `.key` file is mode 0600.
//!
//! `cmg admin connector add` writes a directory of the same shape for a connection point on
//! another host, with none of the site's private keys: `site.toml` (naming the connection point),
//! `pki/site-root.crt`, `pki/connection-point.{crt,key}` (its own certificate) and `logs/`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::SiteError;

/// The site's data directory and the paths inside it.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DataDir { root: root.into() }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn config_file(&self) -> PathBuf {
        self.root.join("site.toml")
    }
    pub fn pki_dir(&self) -> PathBuf {
        self.root.join("pki")
    }
    pub fn logs_dir(&self) -> PathBuf {
        self.root.join("logs")
    }
    /// The embedded database used when `cmg site init` gets no `--db`.
    pub fn default_db_url(&self) -> String {
        // Absolute: site.toml keeps it, and commands run from other directories read it.
        let path = self.root.join("site.db");
        let path = std::path::absolute(&path).unwrap_or(path);
        format!("sqlite://{}", path.display())
    }
    /// Certificate and key file of a named credential in `pki/`.
    pub fn credential(&self, name: &str) -> (PathBuf, PathBuf) {
        let pki = self.pki_dir();
        (
            pki.join(format!("{name}.crt")),
            pki.join(format!("{name}.key")),
        )
    }
    /// The credential name of the token signing certificate with SHA-256 thumbprint `kid`
    /// (base64url, so safe in a file name).
    pub fn token_signing_name(kid: &str) -> String {
        format!("token-signing-{kid}")
    }
}

pub(crate) const SITE_ROOT: &str = "site-root";
pub(crate) const MANAGEMENT_POINT: &str = "mp";
pub(crate) const CONNECTION_POINT: &str = "connection-point";

/// `site.toml`: what every site-side command needs to find the site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    pub site_code: String,
    pub hierarchy_id: Uuid,
    /// `sqlite://…` or `postgres://…`.
    pub db: String,
    /// Set only in the directory `cmg admin connector add` writes for a connection point on
    /// another host: its name. Such a directory holds no key of the site, so only
    /// [`crate::Site::open_for_connection_point`] opens it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_point: Option<String>,
}

impl SiteConfig {
    pub fn load(data: &DataDir) -> Result<Self, SiteError> {
        let path = data.config_file();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SiteError::NotInitialised(data.root().to_owned()));
            }
            Err(e) => return Err(SiteError::io("read", path)(e)),
        };
        toml::from_str(&text).map_err(|e| SiteError::Config {
            path,
            reason: e.to_string(),
        })
    }

    pub(crate) fn save(&self, data: &DataDir) -> Result<(), SiteError> {
        let path = data.config_file();
        let text = toml::to_string(self).map_err(|e| SiteError::Config {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        cmg_pki::write_private_file(&path, text.as_bytes())?;
        Ok(())
    }
}
