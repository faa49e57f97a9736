//! An initialised site, opened: its configuration, database and token keys, each parsed once —
//! or, for a connection point, its configuration and database without any key of the site.

use cmg_log::ComponentLog;
use cmg_pki::SiteAuthority;
use cmg_store::{CertPurpose, CertStatus, CertificateRecord, SiteRecord, Store};
use cmg_token::{SigningKey, TokenIssuer, TokenVerifier, VerificationKey};

use crate::cmg::CmgDefinition;
use crate::layout::SITE_ROOT;
use crate::{DataDir, SiteConfig, SiteError, unix_now};

/// The site's log files (DESIGN §10), in CMTrace format under `logs/`.
#[derive(Debug, Clone)]
pub struct SiteLogs {
    /// `SMSProv.log`: every admin operation, as ConfigMgr's SMS Provider logs them.
    pub provider: ComponentLog,
    /// `MP_RegistrationManager.log`: registrations.
    pub registration: ComponentLog,
    /// `CCM_STS.log`: token renewals.
    pub sts: ComponentLog,
    /// `ClientAuth.log`: every refused device, with the rule that failed.
    pub auth: ComponentLog,
    /// `CloudMgr.log`: CMG definitions created, changed, deleted.
    pub cloud_mgr: ComponentLog,
    /// `CMGSetup.log`: the instance configurations written for a CMG.
    pub cmg_setup: ComponentLog,
}

impl SiteLogs {
    fn open(dir: &std::path::Path) -> Result<Self, SiteError> {
        let open = |component: &str| {
            ComponentLog::open(dir, component)
                .map_err(SiteError::io("open the log in", dir.to_owned()))
        };
        Ok(SiteLogs {
            provider: open("SMSProv")?,
            registration: open("MP_RegistrationManager")?,
            sts: open("CCM_STS")?,
            auth: open("ClientAuth")?,
            cloud_mgr: open("CloudMgr")?,
            cmg_setup: open("CMGSetup")?,
        })
    }
}

/// A site as the admin service and the roles use it.
#[derive(Debug)]
pub struct Site {
    data: DataDir,
    record: SiteRecord,
    store: Store,
    /// `None` when opened for a connection point: no key of the site was read.
    issuer: Option<TokenIssuer>,
    logs: SiteLogs,
}

impl Site {
    /// Opens the site in `data`, on the database its `site.toml` names, with the token signing
    /// key: for the site server, its management point and the admin tools.
    pub async fn open(data: DataDir) -> Result<Site, SiteError> {
        let config = SiteConfig::load(&data)?;
        if config.connection_point.is_some() {
            return Err(SiteError::ConnectionPointDirectory(data.root().to_owned()));
        }
        Self::open_with(data, config, true).await
    }

    /// Opens the site for a connection point: the database (settings, blocked lists, management
    /// points, CMGs and the public verification keys) and the logs, reading no private key of
    /// the site. Works on the site's own data directory and on a directory written by
    /// `cmg admin connector add` for another host. Whatever would mint a token or issue a
    /// certificate then fails with [`SiteError::NoSiteKeys`].
    pub async fn open_for_connection_point(data: DataDir) -> Result<Site, SiteError> {
        let config = SiteConfig::load(&data)?;
        Self::open_with(data, config, false).await
    }

    async fn open_with(data: DataDir, config: SiteConfig, keys: bool) -> Result<Site, SiteError> {
        let store = Store::open(&config.db).await?;
        let record = store.site().await?.ok_or_else(|| {
            SiteError::Inconsistent(format!(
                "{} names a database that holds no site; was it emptied or replaced?",
                data.config_file().display()
            ))
        })?;
        if record.hierarchy_id != config.hierarchy_id {
            return Err(SiteError::Inconsistent(format!(
                "{} belongs to hierarchy {}, the database to {}",
                data.config_file().display(),
                config.hierarchy_id,
                record.hierarchy_id
            )));
        }
        let issuer = if keys {
            let certificates = store.certificates().await?;
            Some(load_issuer(&data, &record, &certificates)?)
        } else {
            None
        };
        let logs = SiteLogs::open(&data.logs_dir())?;
        Ok(Site {
            data,
            record,
            store,
            issuer,
            logs,
        })
    }

    pub fn data(&self) -> &DataDir {
        &self.data
    }
    pub fn record(&self) -> &SiteRecord {
        &self.record
    }
    pub fn store(&self) -> &Store {
        &self.store
    }
    pub fn logs(&self) -> &SiteLogs {
        &self.logs
    }

    /// Mints with the current signing key; [`SiteError::NoSiteKeys`] when the site was opened
    /// for a connection point.
    pub fn issuer(&self) -> Result<&TokenIssuer, SiteError> {
        self.issuer.as_ref().ok_or(SiteError::NoSiteKeys {
            what: "the token signing key",
        })
    }

    /// Whether the site was opened with its keys ([`Site::open`]) rather than for a connection
    /// point.
    pub fn has_keys(&self) -> bool {
        self.issuer.is_some()
    }

    /// A verifier over every token signing key still published at `now` (DESIGN §3.1 rotation).
    pub async fn verifier(&self, now: i64) -> Result<TokenVerifier, SiteError> {
        let certificates = self.store.certificates().await?;
        let keys = published_signing_certificates(&certificates, now)
            .map(|c| VerificationKey::from_certificate(&c.cert_der))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TokenVerifier::new(
            &self.record.hierarchy_id.to_string(),
            keys,
        ))
    }

    pub(crate) fn authority(&self) -> Result<SiteAuthority, SiteError> {
        if !self.has_keys() {
            return Err(SiteError::NoSiteKeys {
                what: "the site root key",
            });
        }
        let (crt, key) = self.data.credential(SITE_ROOT);
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p).map_err(SiteError::io("read", p.to_owned()))
        };
        Ok(SiteAuthority::load(&read(&crt)?, &read(&key)?)?)
    }

    /// The definition of the CMG `name` (any case), as the site has it now.
    pub async fn cmg(&self, name: &str) -> Result<CmgDefinition, SiteError> {
        let record = self
            .store
            .cmgs()
            .await?
            .into_iter()
            .find(|c| c.name.eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                SiteError::Store(cmg_store::StoreError::NotFound {
                    what: "CMG",
                    id: name.chars().take(63).collect(),
                })
            })?;
        CmgDefinition::from_record(&record)
    }

    /// Every CMG of the site.
    pub async fn cmgs(&self) -> Result<Vec<CmgDefinition>, SiteError> {
        self.store
            .cmgs()
            .await?
            .iter()
            .map(CmgDefinition::from_record)
            .collect()
    }

    pub async fn close(&self) {
        self.store.close().await;
    }
}

/// Token signing certificates that verify at `now`: active and not past their retirement.
pub(crate) fn published_signing_certificates(
    certificates: &[CertificateRecord],
    now: i64,
) -> impl Iterator<Item = &CertificateRecord> {
    certificates.iter().filter(move |c| {
        c.purpose == CertPurpose::TokenSigning
            && c.status == CertStatus::Active
            && c.retire_after.is_none_or(|t| t > now)
    })
}

/// The certificate that signs new tokens: the newest published one not scheduled to retire.
pub(crate) fn active_signer(certificates: &[CertificateRecord]) -> Option<&CertificateRecord> {
    published_signing_certificates(certificates, unix_now())
        .filter(|c| c.retire_after.is_none())
        .max_by_key(|c| (c.created_at, c.not_before))
}

fn load_issuer(
    data: &DataDir,
    record: &SiteRecord,
    certificates: &[CertificateRecord],
) -> Result<TokenIssuer, SiteError> {
    let cert = active_signer(certificates).ok_or_else(|| {
        SiteError::Inconsistent("the database lists no active token signing certificate".into())
    })?;
    let (_, key_path) = data.credential(&DataDir::token_signing_name(&cert.thumbprint_sha256));
    let pem = std::fs::read_to_string(&key_path).map_err(SiteError::io("read", &key_path))?;
    let pkcs8 = cmg_pki::key_pem_to_pkcs8(&pem, &key_path.display().to_string())?;
    let key = SigningKey::new(&cert.cert_der, &pkcs8)?;
    Ok(TokenIssuer::new(
        key,
        &record.hierarchy_id.to_string(),
        &record.site_code,
    ))
}
