//! `cmg site init`: everything in DESIGN §3.1, the hierarchy GUID and the database.
//!
//! Order matters so that a failure leaves nothing half-made: inputs and the target are checked
//! first; certificates and keys are made in memory and written; the database then records the
//! site in one transaction (refusing a database that already holds one); `site.toml` is written
//! last, and only its presence means "a site lives here". A failed run removes the key and
//! certificate files it wrote, so it can simply be run again.

use std::fmt;
use std::str::FromStr;

use cmg_pki::{Credential, KeyAlgorithm, Role, SiteAuthority};
use cmg_store::{CertPurpose, CertStatus, CertificateRecord, MpRecord, SiteRecord, Store};
use uuid::Uuid;

use crate::admin::new_role_id;
use crate::layout::{CONNECTION_POINT, MANAGEMENT_POINT, SITE_ROOT};
use crate::server::DEFAULT_MP_PORT;
use crate::{DataDir, SiteConfig, SiteError, unix_now};

/// A site code: exactly three ASCII letters or digits, kept upper case (e.g. `ABC`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteCode(String);

impl FromStr for SiteCode {
    type Err = SiteError;

    fn from_str(s: &str) -> Result<Self, SiteError> {
        if s.len() == 3 && s.chars().all(|c| c.is_ascii_alphanumeric()) {
            Ok(SiteCode(s.to_ascii_uppercase()))
        } else {
            Err(SiteError::BadSiteCode(s.chars().take(40).collect()))
        }
    }
}

impl fmt::Display for SiteCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone)]
pub struct InitOptions {
    pub data: DataDir,
    pub site_code: SiteCode,
    pub token_key: KeyAlgorithm,
    /// Database URL; `None` means the embedded SQLite file in the data directory.
    pub db: Option<String>,
    /// Who runs the command, for the audit log.
    pub actor: String,
}

/// Host names the management point certificate is issued for until MPs are configured.
const DEFAULT_MP_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

pub async fn init_site(opts: InitOptions) -> Result<SiteConfig, SiteError> {
    let data = &opts.data;
    if data.config_file().exists() {
        return Err(SiteError::AlreadyInitialised(data.root().to_owned()));
    }
    create_private_dir(data.root())?;
    create_private_dir(&data.pki_dir())?;
    create_private_dir(&data.logs_dir())?;

    let code = opts.site_code.to_string();
    let root = SiteAuthority::generate(&code)?;
    let signing = root.issue(&code, &Role::TokenSigning, opts.token_key)?;
    let hostnames = DEFAULT_MP_NAMES.iter().map(|s| s.to_string()).collect();
    let mp = root.issue(
        &code,
        &Role::ManagementPoint { hostnames },
        KeyAlgorithm::EcdsaP256,
    )?;
    let cp = root.issue(&code, &Role::ConnectionPoint, KeyAlgorithm::EcdsaP256)?;
    let signing_kid = cmg_pki::thumbprint_sha256(signing.cert_der());
    let signing_name = DataDir::token_signing_name(&signing_kid);

    let now = unix_now();
    let config = SiteConfig {
        site_code: code.clone(),
        hierarchy_id: Uuid::new_v4(),
        db: opts.db.clone().unwrap_or_else(|| data.default_db_url()),
        connection_point: None,
    };
    let record = SiteRecord {
        site_code: code,
        hierarchy_id: config.hierarchy_id,
        created_at: now,
        token_key_alg: token_alg(opts.token_key).to_owned(),
    };
    let credentials = [
        (
            SITE_ROOT,
            CertPurpose::SiteIssuingRoot,
            KeyAlgorithm::EcdsaP256,
            root.credential(),
        ),
        (
            signing_name.as_str(),
            CertPurpose::TokenSigning,
            opts.token_key,
            &signing,
        ),
        (
            MANAGEMENT_POINT,
            CertPurpose::ManagementPoint,
            KeyAlgorithm::EcdsaP256,
            &mp,
        ),
        (
            CONNECTION_POINT,
            CertPurpose::ConnectionPoint,
            KeyAlgorithm::EcdsaP256,
            &cp,
        ),
    ];
    let records = credentials
        .iter()
        .map(|(_, purpose, alg, cred)| certificate_record(cred, *purpose, *alg, now))
        .collect::<Result<Vec<_>, _>>()?;

    let store = Store::open(&config.db).await?;
    let written = write_credentials(data, &credentials);
    let outcome = match written {
        Ok(()) => match store.init_site(&record, &records, &opts.actor).await {
            Ok(()) => match store
                .add_management_point(&default_mp(now), &opts.actor)
                .await
            {
                Ok(()) => config.save(data),
                Err(e) => Err(e.into()),
            },
            Err(e) => Err(e.into()),
        },
        Err(e) => Err(e),
    };
    store.close().await;
    if outcome.is_err() {
        for (name, ..) in &credentials {
            let (crt, key) = data.credential(name);
            let _ = std::fs::remove_file(crt);
            let _ = std::fs::remove_file(key);
        }
    }
    outcome.map(|()| config)
}

/// The management point every site starts with (ConfigMgr installs one with the site), at the
/// address `cmg site run` listens on by default.
fn default_mp(now: i64) -> MpRecord {
    MpRecord {
        role_id: new_role_id(),
        name: "MP1".into(),
        url: format!("https://localhost:{}", DEFAULT_MP_PORT),
        allow_cmg_traffic: true,
        created_at: now,
    }
}

fn write_credentials(
    data: &DataDir,
    credentials: &[(&str, CertPurpose, KeyAlgorithm, &Credential)],
) -> Result<(), SiteError> {
    for (name, _, _, cred) in credentials {
        let (crt, key) = data.credential(name);
        cmg_pki::write_private_file(&key, cred.key_pem().as_bytes())?;
        std::fs::write(&crt, cred.cert_pem()).map_err(SiteError::io("write", &crt))?;
    }
    Ok(())
}

pub(crate) fn token_alg(alg: KeyAlgorithm) -> &'static str {
    match alg {
        KeyAlgorithm::EcdsaP256 => "ES256",
        KeyAlgorithm::Rsa2048 => "RS256",
    }
}

pub(crate) fn certificate_record(
    cred: &Credential,
    purpose: CertPurpose,
    alg: KeyAlgorithm,
    now: i64,
) -> Result<CertificateRecord, SiteError> {
    let info = cred.info()?;
    Ok(CertificateRecord {
        thumbprint_sha256: cmg_pki::thumbprint_sha256(cred.cert_der()),
        thumbprint_sha1: cmg_pki::thumbprint_sha1(cred.cert_der()),
        purpose,
        subject: info.subject,
        not_before: info.not_before,
        not_after: info.not_after,
        status: CertStatus::Active,
        key_alg: alg.as_str().to_owned(),
        cert_der: cred.cert_der().to_vec(),
        created_at: now,
        retire_after: None,
    })
}

/// Creates a directory readable only by its owner (the site's keys live below it).
pub(crate) fn create_private_dir(path: &std::path::Path) -> Result<(), SiteError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(path)
        .map_err(SiteError::io("create directory", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_codes_are_three_letters_or_digits() {
        for good in ["ABC", "abc", "P01", "123"] {
            assert_eq!(
                good.parse::<SiteCode>().unwrap().to_string(),
                good.to_ascii_uppercase()
            );
        }
        for bad in ["", "AB", "ABCD", "A-C", "AB ", "ÄBC", "A_C"] {
            let err = bad.parse::<SiteCode>().unwrap_err();
            assert!(
                err.to_string().contains("exactly three letters or digits"),
                "{bad}: {err}"
            );
        }
    }
}
