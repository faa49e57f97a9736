//! The admin service: every admin operation, once. Each one that changes something is audited
//! and bumps the store's change version in the same transaction, so a running site notices it
//! within seconds (see [`crate::watch_revocations`]) whichever process made it.

use std::fmt;
use std::str::FromStr;

use cmg_pki::{KeyAlgorithm, Role};
use cmg_store::{
    AuditEntry, BulkTokenRecord, CertPurpose, CertStatus, CertificateRecord, DeviceConflict,
    DeviceRecord, MpRecord,
};
use cmg_token::Token;
use serde_json::Value;
use uuid::Uuid;

use crate::cmg::CmgDefinition;
use crate::init::certificate_record;
use crate::site::active_signer;
use crate::{DataDir, Site, SiteError, SiteSettings, format_utc, unix_now};

/// A bulk registration token lifetime in minutes: an integer from 1 to 10,080 (DESIGN §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BulkTokenLifetime(u32);

impl BulkTokenLifetime {
    pub const DEFAULT: BulkTokenLifetime = BulkTokenLifetime(4320);
    pub const MAX_MINUTES: u32 = 10_080;

    pub fn minutes(self) -> u32 {
        self.0
    }
}

impl Default for BulkTokenLifetime {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl FromStr for BulkTokenLifetime {
    type Err = SiteError;

    fn from_str(s: &str) -> Result<Self, SiteError> {
        let shown = || SiteError::BadLifetime(s.chars().take(40).collect());
        // Digits only: no sign, no decimals, no spaces.
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(shown());
        }
        match s.parse::<u32>() {
            Ok(m) if (1..=Self::MAX_MINUTES).contains(&m) => Ok(BulkTokenLifetime(m)),
            _ => Err(shown()),
        }
    }
}

/// A freshly minted bulk registration token. The token is shown once and never stored.
#[derive(Debug)]
pub struct NewBulkToken {
    pub record: BulkTokenRecord,
    pub token: Token,
}

/// What a line of the certificate and token inventory is (the console's Security >
/// Certificates view; `cmg bulk-token list`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum InventoryKind {
    BulkRegistrationToken,
    SiteIssuingRoot,
    TokenSigning,
    ManagementPoint,
    ConnectionPoint,
}

impl InventoryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            InventoryKind::BulkRegistrationToken => "Bulk Registration Token",
            InventoryKind::SiteIssuingRoot => "Site Issuing Root",
            InventoryKind::TokenSigning => "Token Signing",
            InventoryKind::ManagementPoint => "Management Point",
            InventoryKind::ConnectionPoint => "Connection Point",
        }
    }
}

impl fmt::Display for InventoryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for InventoryKind {
    type Err = String;

    /// Accepts the displayed name in any case, with or without spaces, or a short form.
    fn from_str(s: &str) -> Result<Self, String> {
        let key: String = s.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
        let key = key.to_ascii_lowercase();
        ALL_KINDS
            .into_iter()
            .find(|k| {
                let name: String = k.as_str().chars().filter(|c| *c != ' ').collect();
                name.eq_ignore_ascii_case(&key) || short_kind(*k) == key
            })
            .ok_or_else(|| format!("unknown type '{s}': use bulk, root, signing, mp or connector"))
    }
}

const ALL_KINDS: [InventoryKind; 5] = [
    InventoryKind::BulkRegistrationToken,
    InventoryKind::SiteIssuingRoot,
    InventoryKind::TokenSigning,
    InventoryKind::ManagementPoint,
    InventoryKind::ConnectionPoint,
];

fn short_kind(k: InventoryKind) -> &'static str {
    match k {
        InventoryKind::BulkRegistrationToken => "bulk",
        InventoryKind::SiteIssuingRoot => "root",
        InventoryKind::TokenSigning => "signing",
        InventoryKind::ManagementPoint => "mp",
        InventoryKind::ConnectionPoint => "connector",
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemStatus {
    Active,
    Expired,
    Blocked,
    Retired,
}

impl ItemStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ItemStatus::Active => "Active",
            ItemStatus::Expired => "Expired",
            ItemStatus::Blocked => "Blocked",
            ItemStatus::Retired => "Retired",
        }
    }
}

/// One site certificate or bulk registration token, as admins see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InventoryItem {
    pub kind: InventoryKind,
    /// The tracking GUID of a bulk token; the SHA-256 thumbprint of a certificate.
    pub id: String,
    pub valid_from: i64,
    pub valid_until: i64,
    pub status: ItemStatus,
    /// Who created a bulk token; the subject of a certificate.
    pub detail: String,
}

/// The admin service of one site, acting for one admin (`actor`, recorded in the audit log).
#[derive(Debug)]
pub struct AdminService {
    site: Site,
    actor: String,
}

/// How long a retiring token signing key keeps verifying: the longest client token validity
/// plus the clock leeway, so no token it signed is cut short (DESIGN §3.1).
const RETIRE_GRACE_SECS: i64 = 90 * 86_400 + cmg_token::LEEWAY_SECS;

impl AdminService {
    pub async fn open(data: DataDir, actor: impl Into<String>) -> Result<Self, SiteError> {
        Ok(AdminService {
            site: Site::open(data).await?,
            actor: actor.into(),
        })
    }

    pub fn site(&self) -> &Site {
        &self.site
    }

    /// The admin this service acts for, as the audit log records them.
    pub(crate) fn actor(&self) -> &str {
        &self.actor
    }

    /// Mints a bulk registration token valid from now for `lifetime`; records only its GUID,
    /// validity and creator (never the token) before handing it out.
    pub async fn new_bulk_token(
        &self,
        lifetime: BulkTokenLifetime,
    ) -> Result<NewBulkToken, SiteError> {
        let id = Uuid::new_v4();
        let now = unix_now();
        let (token, claims) = self.site.issuer()?.mint_bulk(
            &id.to_string(),
            now,
            i64::from(lifetime.minutes()) * 60,
        )?;
        let record = BulkTokenRecord {
            id,
            valid_from: claims.nbf,
            valid_until: claims.exp,
            created_at: now,
            created_by: self.actor.clone(),
            blocked: false,
        };
        self.site.store().record_bulk_token(&record).await?;
        self.site.logs().provider.info(&format!(
            "{} created bulk registration token {id}, valid from {} until {}",
            self.actor,
            format_utc(record.valid_from),
            format_utc(record.valid_until)
        ));
        Ok(NewBulkToken { record, token })
    }

    pub async fn block_bulk_token(&self, guid: &str) -> Result<BulkTokenRecord, SiteError> {
        self.set_blocked(guid, true).await
    }

    pub async fn unblock_bulk_token(&self, guid: &str) -> Result<BulkTokenRecord, SiteError> {
        self.set_blocked(guid, false).await
    }

    async fn set_blocked(&self, guid: &str, blocked: bool) -> Result<BulkTokenRecord, SiteError> {
        let id = parse_guid(guid)?;
        let record = self
            .site
            .store()
            .set_bulk_token_blocked(id, blocked, &self.actor)
            .await?;
        let verb = if blocked { "blocked" } else { "unblocked" };
        self.site.logs().provider.info(&format!(
            "{} {verb} bulk registration token {id}",
            self.actor
        ));
        Ok(record)
    }

    /// Every site certificate and bulk registration token, sorted by type then validity.
    pub async fn inventory(&self, now: i64) -> Result<Vec<InventoryItem>, SiteError> {
        let store = self.site.store();
        let tokens = store
            .bulk_tokens()
            .await?
            .into_iter()
            .map(|t| InventoryItem {
                kind: InventoryKind::BulkRegistrationToken,
                id: t.id.to_string(),
                valid_from: t.valid_from,
                valid_until: t.valid_until,
                status: if t.blocked {
                    ItemStatus::Blocked
                } else if now >= t.valid_until {
                    ItemStatus::Expired
                } else {
                    ItemStatus::Active
                },
                detail: t.created_by,
            });
        let certs = store
            .certificates()
            .await?
            .into_iter()
            .map(|c| InventoryItem {
                kind: match c.purpose {
                    CertPurpose::SiteIssuingRoot => InventoryKind::SiteIssuingRoot,
                    CertPurpose::TokenSigning => InventoryKind::TokenSigning,
                    CertPurpose::ManagementPoint => InventoryKind::ManagementPoint,
                    CertPurpose::ConnectionPoint => InventoryKind::ConnectionPoint,
                },
                status: if c.status == CertStatus::Retired
                    || c.retire_after.is_some_and(|t| t <= now)
                {
                    ItemStatus::Retired
                } else if now >= c.not_after {
                    ItemStatus::Expired
                } else {
                    ItemStatus::Active
                },
                id: c.thumbprint_sha256,
                valid_from: c.not_before,
                valid_until: c.not_after,
                detail: c.subject,
            });
        let mut items: Vec<InventoryItem> = tokens.chain(certs).collect();
        items.sort_by(|a, b| (a.kind, a.valid_from, &a.id).cmp(&(b.kind, b.valid_from, &b.id)));
        Ok(items)
    }

    /// Adds a new token signing certificate that signs from now on; the previous one keeps
    /// verifying until every token it signed has expired, then retires by itself.
    pub async fn rotate_token_signing_key(
        &self,
        alg: KeyAlgorithm,
    ) -> Result<CertificateRecord, SiteError> {
        let store = self.site.store();
        let code = &self.site.record().site_code;
        let cred = self
            .site
            .authority()?
            .issue(code, &Role::TokenSigning, alg)?;
        let now = unix_now();
        let record = certificate_record(&cred, CertPurpose::TokenSigning, alg, now)?;
        let (crt, key) = self
            .site
            .data()
            .credential(&DataDir::token_signing_name(&record.thumbprint_sha256));
        cmg_pki::write_private_file(&key, cred.key_pem().as_bytes())?;
        std::fs::write(&crt, cred.cert_pem()).map_err(SiteError::io("write", &crt))?;
        let previous = store.certificates().await?;
        store.add_certificate(&record, &self.actor).await?;
        for old in previous
            .iter()
            .filter(|c| c.purpose == CertPurpose::TokenSigning && c.retire_after.is_none())
        {
            store
                .set_certificate_retire_after(
                    &old.thumbprint_sha256,
                    Some(now + RETIRE_GRACE_SECS),
                    &self.actor,
                )
                .await?;
        }
        self.site.logs().provider.info(&format!(
            "{} added token signing certificate {}; previous ones retire after their tokens expire",
            self.actor, record.thumbprint_sha256
        ));
        Ok(record)
    }

    /// Stops publishing a token signing certificate at once (e.g. its key leaked). Tokens it
    /// signed stop verifying. The certificate that signs new tokens cannot be retired.
    pub async fn retire_token_signing_key(&self, kid: &str) -> Result<(), SiteError> {
        let store = self.site.store();
        let certificates = store.certificates().await?;
        let cert = certificates
            .iter()
            .find(|c| c.purpose == CertPurpose::TokenSigning && c.thumbprint_sha256 == kid)
            .ok_or_else(|| SiteError::UnknownSigningKey(kid.chars().take(60).collect()))?;
        if active_signer(&certificates)
            .is_some_and(|a| a.thumbprint_sha256 == cert.thumbprint_sha256)
        {
            return Err(SiteError::RetireActiveSigner(
                cert.thumbprint_sha256.clone(),
            ));
        }
        store
            .set_certificate_status(&cert.thumbprint_sha256, CertStatus::Retired, &self.actor)
            .await?;
        self.site.logs().provider.warn(&format!(
            "{} retired token signing certificate {}; tokens it signed no longer verify",
            self.actor, cert.thumbprint_sha256
        ));
        Ok(())
    }

    /// The JWKS document of every published verification key.
    pub async fn jwks(&self) -> Result<Value, SiteError> {
        Ok(self.site.verifier(unix_now()).await?.jwks())
    }

    pub async fn audit_log(&self, limit: u32) -> Result<Vec<AuditEntry>, SiteError> {
        Ok(self.site.store().audit_log(limit).await?)
    }
}

impl AdminService {
    pub async fn devices(&self) -> Result<Vec<DeviceRecord>, SiteError> {
        Ok(self.site.store().devices().await?)
    }

    pub async fn device(&self, client_id: &str) -> Result<DeviceRecord, SiteError> {
        let id = parse_client_id(client_id)?;
        self.site
            .store()
            .device(&id)
            .await?
            .ok_or_else(|| SiteError::Store(cmg_store::StoreError::NotFound { what: "device", id }))
    }

    /// Blocks a device: its token is refused from the next request on, everywhere.
    pub async fn block_device(&self, client_id: &str) -> Result<DeviceRecord, SiteError> {
        self.set_device_blocked(client_id, true).await
    }

    pub async fn unblock_device(&self, client_id: &str) -> Result<DeviceRecord, SiteError> {
        self.set_device_blocked(client_id, false).await
    }

    async fn set_device_blocked(
        &self,
        client_id: &str,
        blocked: bool,
    ) -> Result<DeviceRecord, SiteError> {
        let id = parse_client_id(client_id)?;
        let device = self
            .site
            .store()
            .set_device_blocked(&id, blocked, &self.actor)
            .await?;
        let verb = if blocked { "blocked" } else { "unblocked" };
        self.site
            .logs()
            .provider
            .info(&format!("{} {verb} device {id}", self.actor));
        Ok(device)
    }

    /// Approves a device waiting for approval; it gets its token when it next registers.
    pub async fn approve_device(&self, client_id: &str) -> Result<DeviceRecord, SiteError> {
        let id = parse_client_id(client_id)?;
        let device = self.site.store().approve_device(&id, &self.actor).await?;
        self.site
            .logs()
            .provider
            .info(&format!("{} approved device {id}", self.actor));
        Ok(device)
    }

    pub async fn device_conflicts(
        &self,
        include_resolved: bool,
    ) -> Result<Vec<DeviceConflict>, SiteError> {
        Ok(self.site.store().device_conflicts(include_resolved).await?)
    }

    /// Merges a conflicting record into the record it conflicts with: the existing client ID
    /// keeps its history and takes the new certificate.
    pub async fn merge_conflict(&self, new_client_id: &str) -> Result<DeviceRecord, SiteError> {
        let id = parse_client_id(new_client_id)?;
        let merged = self
            .site
            .store()
            .merge_device_conflict(&id, &self.actor)
            .await?;
        self.site.logs().provider.info(&format!(
            "{} merged conflicting record {id} into {}",
            self.actor, merged.client_id
        ));
        Ok(merged)
    }

    /// Every setting: name, value, description.
    pub async fn settings(&self) -> Result<Vec<(&'static str, String, &'static str)>, SiteError> {
        Ok(SiteSettings::describe(&self.site.store().settings().await?))
    }

    /// Changes a setting after checking it (and its consistency with the others).
    pub async fn set_setting(&self, name: &str, value: &str) -> Result<String, SiteError> {
        let store = self.site.store();
        let value = SiteSettings::validate_change(&store.settings().await?, name, value)?;
        store.set_setting(name, &value, &self.actor).await?;
        self.site
            .logs()
            .provider
            .info(&format!("{} set {name} = {value}", self.actor));
        Ok(value)
    }

    pub async fn management_points(&self) -> Result<Vec<MpRecord>, SiteError> {
        Ok(self.site.store().management_points().await?)
    }

    /// Adds a management point; without `role_id` one is generated.
    pub async fn add_management_point(
        &self,
        name: &str,
        url: &str,
        allow_cmg_traffic: bool,
        role_id: Option<i64>,
    ) -> Result<MpRecord, SiteError> {
        let record = MpRecord {
            role_id: role_id.unwrap_or_else(new_role_id),
            name: name.to_owned(),
            url: check_mp_url(url)?,
            allow_cmg_traffic,
            created_at: unix_now(),
        };
        self.site
            .store()
            .add_management_point(&record, &self.actor)
            .await?;
        self.site.logs().provider.info(&format!(
            "{} added management point {} ({})",
            self.actor, record.role_id, record.url
        ));
        Ok(record)
    }

    pub async fn set_management_point(
        &self,
        role_id: i64,
        url: Option<&str>,
        allow_cmg_traffic: Option<bool>,
    ) -> Result<MpRecord, SiteError> {
        let url = url.map(check_mp_url).transpose()?;
        let record = self
            .site
            .store()
            .set_management_point(role_id, url.as_deref(), allow_cmg_traffic, &self.actor)
            .await?;
        self.site.logs().provider.info(&format!(
            "{} changed management point {role_id}: {} (CMG traffic {})",
            self.actor,
            record.url,
            if record.allow_cmg_traffic {
                "allowed"
            } else {
                "not allowed"
            }
        ));
        Ok(record)
    }
}

impl AdminService {
    /// Records a CMG and writes each instance's ready-to-run configuration (with the server key)
    /// under `<data>/cmg/<name>/`. Returns the config files and any warnings for the admin.
    pub async fn create_cmg(
        &self,
        def: &CmgDefinition,
        server_key_pem: &str,
    ) -> Result<(Vec<std::path::PathBuf>, Vec<String>), SiteError> {
        let warnings = def.validate()?;
        let store = self.site.store();
        if store
            .cmgs()
            .await?
            .iter()
            .any(|c| c.name.eq_ignore_ascii_case(&def.name))
        {
            return Err(SiteError::Store(cmg_store::StoreError::AlreadyExists {
                what: "CMG",
                id: def.name.clone(),
            }));
        }
        cmg_pki::tls::server_config(&def.server_chain_pem, server_key_pem)?;
        let files = crate::cmg::write_instance_configs(self.site.data(), def, server_key_pem)?;
        self.put_cmg(def).await?;
        let logs = self.site.logs();
        logs.cloud_mgr.info(&format!(
            "{} created CMG {} ({}), {} instance(s)",
            self.actor, def.name, def.fqdn, def.instances
        ));
        for file in &files {
            logs.cmg_setup.info(&format!(
                "Wrote the configuration of a gateway instance of {}: {}",
                def.name,
                file.display()
            ));
        }
        for warning in &warnings {
            logs.cloud_mgr.warn(warning);
        }
        Ok((files, warnings))
    }

    /// Changes a CMG's settings; running gateways receive them over their tunnels.
    pub async fn modify_cmg(
        &self,
        name: &str,
        change: impl FnOnce(&mut CmgDefinition),
    ) -> Result<(CmgDefinition, Vec<String>), SiteError> {
        let mut def = self.cmg(name).await?;
        change(&mut def);
        let warnings = def.validate()?;
        self.put_cmg(&def).await?;
        self.site
            .logs()
            .cloud_mgr
            .info(&format!("{} modified CMG {}", self.actor, def.name));
        Ok((def, warnings))
    }

    pub async fn cmg(&self, name: &str) -> Result<CmgDefinition, SiteError> {
        self.site.cmg(name).await
    }

    pub async fn cmgs(&self) -> Result<Vec<CmgDefinition>, SiteError> {
        self.site.cmgs().await
    }

    /// Requests and bytes per endpoint over the last 14 days, and the outbound data alert level.
    pub async fn cmg_traffic(
        &self,
        name: &str,
    ) -> Result<(Vec<cmg_store::EndpointTraffic>, crate::cmg::AlertLevel), SiteError> {
        let def = self.cmg(name).await?;
        let since = unix_now() - crate::cmg::ALERT_WINDOW_SECS;
        let totals = self.site.store().traffic_since(&def.name, since).await?;
        let bytes_out = totals.iter().map(|t| t.bytes_out).sum();
        Ok((
            totals,
            crate::cmg::alert_level(bytes_out, def.data_alert_gb),
        ))
    }

    pub async fn delete_cmg(&self, name: &str) -> Result<(), SiteError> {
        let def = self.cmg(name).await?;
        self.site.store().delete_cmg(&def.name, &self.actor).await?;
        self.site
            .logs()
            .cloud_mgr
            .info(&format!("{} deleted CMG {}", self.actor, def.name));
        Ok(())
    }

    async fn put_cmg(&self, def: &CmgDefinition) -> Result<(), SiteError> {
        let now = unix_now();
        let definition =
            serde_json::to_string(def).map_err(|e| SiteError::Inconsistent(e.to_string()))?;
        let record = cmg_store::CmgRecord {
            name: def.name.clone(),
            fqdn: def.fqdn.clone(),
            instances: i32::from(def.instances),
            definition,
            created_at: now,
            updated_at: now,
        };
        Ok(self.site.store().put_cmg(&record, &self.actor).await?)
    }
}

/// A new MP role ID: a large decimal number, as ConfigMgr's (e.g. 72186325152220500).
pub(crate) fn new_role_id() -> i64 {
    let random = Uuid::new_v4().as_u128() as u64;
    10_000_000_000_000_000 + i64::try_from(random % 80_000_000_000_000_000).unwrap_or(0)
}

fn check_mp_url(url: &str) -> Result<String, SiteError> {
    let url = url.trim().trim_end_matches('/');
    let host = url.strip_prefix("https://").unwrap_or_default();
    if host.is_empty() || host.contains(char::is_whitespace) || host.contains('/') {
        return Err(SiteError::BadSetting {
            name: "url".into(),
            reason: format!(
                "'{}' is not https://HOST[:PORT] — management points speak HTTPS only",
                url.chars().take(80).collect::<String>()
            ),
        });
    }
    Ok(url.to_owned())
}

/// `GUID:1234…` in any case, with or without braces → `GUID:` + upper-case GUID.
pub(crate) fn parse_client_id(s: &str) -> Result<String, SiteError> {
    let trimmed = s.trim();
    let guid = trimmed
        .get(..5)
        .filter(|p| p.eq_ignore_ascii_case("GUID:"))
        .and_then(|_| trimmed.get(5..))
        .ok_or_else(|| SiteError::BadClientId(s.chars().take(60).collect()))?;
    let id = parse_guid(guid).map_err(|_| SiteError::BadClientId(s.chars().take(60).collect()))?;
    Ok(format!("GUID:{}", id.to_string().to_uppercase()))
}

fn parse_guid(s: &str) -> Result<Uuid, SiteError> {
    let trimmed = s.trim().trim_start_matches('{').trim_end_matches('}');
    Uuid::parse_str(trimmed).map_err(|_| SiteError::BadGuid(s.chars().take(60).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetime_accepts_1_to_10080_whole_minutes_only() {
        assert_eq!("1".parse::<BulkTokenLifetime>().unwrap().minutes(), 1);
        assert_eq!(
            "10080".parse::<BulkTokenLifetime>().unwrap().minutes(),
            10080
        );
        assert_eq!(BulkTokenLifetime::default().minutes(), 4320);
        for bad in [
            "0",
            "10081",
            "-5",
            "abc",
            "1.5",
            "",
            " 5",
            "+5",
            "99999999999999999999",
        ] {
            let err = bad.parse::<BulkTokenLifetime>().unwrap_err();
            assert!(err.to_string().contains("from 1 to 10080"), "{bad}: {err}");
        }
    }

    #[test]
    fn client_ids_are_normalised_and_checked() {
        let id = "GUID:0c2d1d3a-0000-4000-8000-000000000001";
        assert_eq!(
            parse_client_id(id).unwrap(),
            "GUID:0C2D1D3A-0000-4000-8000-000000000001"
        );
        assert_eq!(
            parse_client_id("guid:{0C2D1D3A-0000-4000-8000-000000000001}").unwrap(),
            "GUID:0C2D1D3A-0000-4000-8000-000000000001"
        );
        for bad in [
            "0c2d1d3a-0000-4000-8000-000000000001",
            "GUID:",
            "GUID:xyz",
            "",
            "GUI",
        ] {
            assert!(parse_client_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn role_ids_are_large_and_mp_urls_https() {
        let id = new_role_id();
        assert!((10_000_000_000_000_000..90_000_000_000_000_000).contains(&id));
        assert_eq!(
            check_mp_url("https://mp.contoso.com:8443/").unwrap(),
            "https://mp.contoso.com:8443"
        );
        for bad in ["http://mp", "https://", "mp.contoso.com", "https://a b"] {
            assert!(check_mp_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn inventory_kinds_parse_from_names_and_short_forms() {
        assert_eq!("bulk".parse(), Ok(InventoryKind::BulkRegistrationToken));
        assert_eq!(
            "Bulk Registration Token".parse(),
            Ok(InventoryKind::BulkRegistrationToken)
        );
        assert_eq!("token-signing".parse(), Ok(InventoryKind::TokenSigning));
        assert!("nonsense".parse::<InventoryKind>().is_err());
    }
}
