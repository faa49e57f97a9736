//! Connection points on other site-side hosts (`cmg admin connector add|list|remove`; ConfigMgr:
//! "add the CMG connection point site system role").
//!
//! Each gets a certificate of its own from the site root, recorded in the store as a connection
//! point certificate exactly like the one `cmg site init` makes — which is what the management
//! points read to decide whose relayed device identities they believe (DESIGN §6) — and a
//! directory to copy to its host holding what `cmg connector run` needs and no private key of
//! the site: `site.toml` naming the same database, the site root certificate, its own
//! certificate and key, and `logs/`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use cmg_pki::{KeyAlgorithm, Role};
use cmg_store::{Backend, CertPurpose, CertStatus, CertificateRecord, ConnectionPointRecord};

use crate::init::{certificate_record, create_private_dir};
use crate::layout::{CONNECTION_POINT, SITE_ROOT};
use crate::{AdminService, DataDir, ItemStatus, SiteConfig, SiteError, unix_now};

/// A connection point's name: 1 to 63 letters, digits, `-`, `_` or `.`, starting with a letter or
/// digit — typically its host's name. Unique on the site whatever its case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionPointName(String);

impl FromStr for ConnectionPointName {
    type Err = SiteError;

    fn from_str(s: &str) -> Result<Self, SiteError> {
        let ok = (1..=63).contains(&s.len())
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if ok {
            Ok(ConnectionPointName(s.to_owned()))
        } else {
            Err(SiteError::BadConnectionPointName(
                s.chars().take(70).collect(),
            ))
        }
    }
}

impl ConnectionPointName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ConnectionPointName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A connection point just added: what the store recorded and the directory written for it.
#[derive(Debug)]
pub struct NewConnectionPoint {
    pub record: ConnectionPointRecord,
    pub certificate: CertificateRecord,
    /// The directory to copy to the connection point's host.
    pub dir: PathBuf,
    /// Every file written there.
    pub files: Vec<PathBuf>,
}

/// One connection point of the site, as `cmg admin connector list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionPointInfo {
    /// `None` for the site server's own connection point (made by `cmg site init`).
    pub name: Option<String>,
    /// SHA-256 thumbprint (base64url) of its certificate.
    pub thumbprint_sha256: String,
    pub valid_until: i64,
    /// Active or Expired: a removed connection point is no longer listed.
    pub status: ItemStatus,
    pub created_at: i64,
    pub created_by: Option<String>,
}

/// The files of the directory written for a connection point, relative to it.
const SITE_ROOT_FILE: &str = "pki/site-root.crt";

impl AdminService {
    /// Adds a connection point for another host: issues its certificate from the site root,
    /// writes `out` (created 0700; it must not exist or be empty) and then records the
    /// certificate — from the next change poll on, management points believe the identities it
    /// relays. A site on SQLite is refused unless `same_host`: another host cannot share the
    /// file. Nothing is recorded, and what was written is removed, when a step fails.
    pub async fn add_connection_point(
        &self,
        name: &ConnectionPointName,
        out: &Path,
        same_host: bool,
    ) -> Result<NewConnectionPoint, SiteError> {
        let site = self.site();
        let store = site.store();
        let config = SiteConfig::load(site.data())?;
        if store.backend() == Backend::Sqlite && !same_host {
            return Err(SiteError::SqliteNotShared(config.db.clone()));
        }
        if store
            .connection_points()
            .await?
            .iter()
            .any(|c| c.name.eq_ignore_ascii_case(name.as_str()))
        {
            return Err(SiteError::ConnectionPointExists(name.to_string()));
        }
        let created = match std::fs::read_dir(out) {
            Ok(entries) => {
                if entries.into_iter().next().is_some() {
                    return Err(SiteError::OutNotEmpty(out.to_owned()));
                }
                false
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => return Err(SiteError::io("read", out)(e)),
        };

        let code = &site.record().site_code;
        let cred =
            site.authority()?
                .issue(code, &Role::ConnectionPoint, KeyAlgorithm::EcdsaP256)?;
        let certificate = certificate_record(
            &cred,
            CertPurpose::ConnectionPoint,
            KeyAlgorithm::EcdsaP256,
            unix_now(),
        )?;
        let dir = DataDir::new(out);
        let written = write_directory(&dir, site.data(), &config, name, &cred);
        let outcome = match written {
            Ok(files) => match store
                .add_connection_point(name.as_str(), &certificate, self.actor())
                .await
            {
                Ok(record) => Ok((record, files)),
                Err(cmg_store::StoreError::AlreadyExists {
                    what: "connection point",
                    ..
                }) => Err(SiteError::ConnectionPointExists(name.to_string())),
                Err(e) => Err(e.into()),
            },
            Err(e) => Err(e),
        };
        let (record, files) = match outcome {
            Ok(done) => done,
            Err(e) => {
                remove_written(&dir, created);
                return Err(e);
            }
        };
        site.logs().provider.info(&format!(
            "{} added connection point {} with certificate {}; its files are in {}",
            self.actor(),
            record.name,
            record.thumbprint_sha256,
            out.display()
        ));
        Ok(NewConnectionPoint {
            record,
            certificate,
            dir: out.to_owned(),
            files,
        })
    }

    /// The site's connection points: the site server's own, then those added, oldest first.
    pub async fn connection_points(&self, now: i64) -> Result<Vec<ConnectionPointInfo>, SiteError> {
        let store = self.site().store();
        let added = store.connection_points().await?;
        let certificates: Vec<CertificateRecord> = store
            .certificates()
            .await?
            .into_iter()
            .filter(|c| c.purpose == CertPurpose::ConnectionPoint && c.status == CertStatus::Active)
            .collect();
        let status = |c: &CertificateRecord| {
            if now >= c.not_after {
                ItemStatus::Expired
            } else {
                ItemStatus::Active
            }
        };
        let own = certificates
            .iter()
            .filter(|c| {
                !added
                    .iter()
                    .any(|a| a.thumbprint_sha256 == c.thumbprint_sha256)
            })
            .map(|c| ConnectionPointInfo {
                name: None,
                thumbprint_sha256: c.thumbprint_sha256.clone(),
                valid_until: c.not_after,
                status: status(c),
                created_at: c.created_at,
                created_by: None,
            });
        let others = added.iter().filter_map(|a| {
            let cert = certificates
                .iter()
                .find(|c| c.thumbprint_sha256 == a.thumbprint_sha256)?;
            Some(ConnectionPointInfo {
                name: Some(a.name.clone()),
                thumbprint_sha256: a.thumbprint_sha256.clone(),
                valid_until: cert.not_after,
                status: status(cert),
                created_at: a.created_at,
                created_by: Some(a.created_by.clone()),
            })
        });
        Ok(own.chain(others).collect())
    }

    /// Removes the connection point `name` (any case) and retires its certificate: management
    /// points stop believing what it relays at their next change poll (about a second), and a
    /// running `cmg connector run` with it closes its tunnels.
    pub async fn remove_connection_point(
        &self,
        name: &str,
    ) -> Result<ConnectionPointRecord, SiteError> {
        let record = self
            .site()
            .store()
            .remove_connection_point(name, self.actor())
            .await
            .map_err(|e| match e {
                cmg_store::StoreError::NotFound {
                    what: "connection point",
                    ..
                } => SiteError::UnknownConnectionPoint(name.chars().take(70).collect()),
                e => e.into(),
            })?;
        self.site().logs().provider.info(&format!(
            "{} removed connection point {}; its certificate {} is retired and management points no longer believe what it relays",
            self.actor(),
            record.name,
            record.thumbprint_sha256
        ));
        Ok(record)
    }
}

/// Writes the connection point's directory; returns the files written.
fn write_directory(
    dir: &DataDir,
    site_data: &DataDir,
    site_config: &SiteConfig,
    name: &ConnectionPointName,
    cred: &cmg_pki::Credential,
) -> Result<Vec<PathBuf>, SiteError> {
    create_private_dir(dir.root())?;
    // An existing empty directory keeps its mode otherwise: the key below must be private.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.root(), std::fs::Permissions::from_mode(0o700))
            .map_err(SiteError::io("restrict", dir.root()))?;
    }
    create_private_dir(&dir.pki_dir())?;
    create_private_dir(&dir.logs_dir())?;
    let (site_root, _) = site_data.credential(SITE_ROOT);
    let root_pem =
        std::fs::read_to_string(&site_root).map_err(SiteError::io("read", &site_root))?;
    let root_copy = dir.root().join(SITE_ROOT_FILE);
    std::fs::write(&root_copy, root_pem).map_err(SiteError::io("write", &root_copy))?;
    let (crt, key) = dir.credential(CONNECTION_POINT);
    cmg_pki::write_private_file(&key, cred.key_pem().as_bytes())?;
    std::fs::write(&crt, cred.cert_pem()).map_err(SiteError::io("write", &crt))?;
    let config = SiteConfig {
        connection_point: Some(name.to_string()),
        ..site_config.clone()
    };
    config.save(dir)?;
    Ok(vec![dir.config_file(), root_copy, crt, key])
}

/// Undoes [`write_directory`]: the whole directory when it was made here, else what went in it.
fn remove_written(dir: &DataDir, created: bool) {
    if created {
        let _ = std::fs::remove_dir_all(dir.root());
    } else {
        let _ = std::fs::remove_file(dir.config_file());
        let _ = std::fs::remove_dir_all(dir.pki_dir());
        let _ = std::fs::remove_dir_all(dir.logs_dir());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_host_like() {
        for good in ["CP2", "cp2.contoso.com", "site-b_cp", "a"] {
            assert_eq!(good.parse::<ConnectionPointName>().unwrap().as_str(), good);
        }
        let long = "x".repeat(64);
        for bad in ["", "-cp", ".cp", "cp 2", "cp/2", "ÄCP", long.as_str()] {
            let err = bad.parse::<ConnectionPointName>().unwrap_err();
            assert!(err.to_string().contains("1 to 63 letters"), "{bad}: {err}");
        }
    }
}
