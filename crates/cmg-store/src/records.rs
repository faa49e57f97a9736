//! The rows of the site database as plain Rust values, and their decoding from `AnyRow`.

use sqlx::any::AnyRow;
use sqlx::{Any, Decode, Row, Type};
use uuid::Uuid;

use crate::{Result, StoreError};

/// The site itself (table `site`, one row), written by `cmg site init`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteRecord {
    pub site_code: String,
    /// The hierarchy ID, also the tokens' `TenantId`.
    pub hierarchy_id: Uuid,
    pub created_at: i64,
    /// `ES256` or `RS256`.
    pub token_key_alg: String,
}

/// What a site certificate is for (DESIGN §3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CertPurpose {
    SiteIssuingRoot,
    TokenSigning,
    ManagementPoint,
    ConnectionPoint,
}

impl CertPurpose {
    pub const ALL: [CertPurpose; 4] = [
        CertPurpose::SiteIssuingRoot,
        CertPurpose::TokenSigning,
        CertPurpose::ManagementPoint,
        CertPurpose::ConnectionPoint,
    ];

    /// The name stored in the database and shown to admins.
    pub fn as_str(self) -> &'static str {
        match self {
            CertPurpose::SiteIssuingRoot => "SiteIssuingRoot",
            CertPurpose::TokenSigning => "TokenSigning",
            CertPurpose::ManagementPoint => "ManagementPoint",
            CertPurpose::ConnectionPoint => "ConnectionPoint",
        }
    }
}

/// Whether a certificate is in use. A retired token signing certificate is no longer published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CertStatus {
    Active,
    Retired,
}

impl CertStatus {
    pub const ALL: [CertStatus; 2] = [CertStatus::Active, CertStatus::Retired];

    /// The name stored in the database and shown to admins.
    pub fn as_str(self) -> &'static str {
        match self {
            CertStatus::Active => "Active",
            CertStatus::Retired => "Retired",
        }
    }
}

/// A site certificate (table `certificates`). Only the public certificate: private keys never go
/// into the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateRecord {
    /// base64url SHA-256 of the DER; the JWS `kid`.
    pub thumbprint_sha256: String,
    /// base64url SHA-1 of the DER; the JWS `x5t`.
    pub thumbprint_sha1: String,
    pub purpose: CertPurpose,
    pub subject: String,
    pub not_before: i64,
    pub not_after: i64,
    pub status: CertStatus,
    pub key_alg: String,
    pub cert_der: Vec<u8>,
    pub created_at: i64,
    /// When an old token signing certificate may stop being published (key rotation, §3.1).
    pub retire_after: Option<i64>,
}

/// A connection point added for another host (table `connection_points`); its certificate is
/// the row of `certificates` with this thumbprint. The site server's own connection point
/// (made by `cmg site init`) has a certificate but no such row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionPointRecord {
    /// As the admin gave it; unique whatever its case.
    pub name: String,
    /// SHA-256 thumbprint (base64url) of its certificate.
    pub thumbprint_sha256: String,
    pub created_at: i64,
    pub created_by: String,
}

/// A bulk registration token's tracking record (table `bulk_tokens`). The token itself is never
/// stored (DESIGN §3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BulkTokenRecord {
    /// The token's `UniqueId`.
    pub id: Uuid,
    /// `nbf`.
    pub valid_from: i64,
    /// `exp`.
    pub valid_until: i64,
    pub created_at: i64,
    pub created_by: String,
    pub blocked: bool,
}

/// A registered device (table `devices`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    /// `GUID:` + upper-case GUID.
    pub client_id: String,
    pub hardware_id: String,
    /// base64url SHA-256 of the device certificate (the client token's `cnf`).
    pub cert_thumbprint: String,
    pub hostname: String,
    pub os: String,
    pub agent_version: String,
    /// `InternalNetwork`, `BulkRegistration` or `PKI`.
    pub registered_via: String,
    pub bulk_token_id: Option<Uuid>,
    pub approved: bool,
    pub blocked: bool,
    pub registered_at: i64,
    pub last_seen_at: Option<i64>,
    pub last_seen_via: Option<String>,
}

/// A registration that matched an existing record's hardware ID (table `device_conflicts`):
/// ConfigMgr's "conflicting record", left for an admin to merge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConflict {
    /// The record created by the conflicting registration.
    pub new_client_id: String,
    /// The record it conflicts with (the same hardware ID).
    pub existing_client_id: String,
    pub detected_at: i64,
    /// `None` while the conflict waits for an admin.
    pub resolved_at: Option<i64>,
    /// How it was resolved: `merged`.
    pub resolution: Option<String>,
}

/// A management point of the site (table `management_points`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MpRecord {
    /// The MP's role ID, as in gateway URLs (DESIGN §5.1).
    pub role_id: i64,
    pub name: String,
    /// Its intranet URL, e.g. `https://mp1.contoso.com`.
    pub url: String,
    /// Whether the connection point may send it gateway traffic.
    pub allow_cmg_traffic: bool,
    pub created_at: i64,
}

/// A cloud management gateway definition (table `cmgs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmgRecord {
    pub name: String,
    pub fqdn: String,
    /// Gateway instances, 1–16.
    pub instances: i32,
    /// The rest of the definition, as JSON text.
    pub definition: String,
    pub created_at: i64,
    pub updated_at: i64,
}

/// One status message as a client sends it (a row of table `status_messages`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusRow {
    /// Unique per client: a message sent again with the same ID is a duplicate.
    pub message_id: String,
    pub kind: String,
    /// When the client sent it (its own clock).
    pub sent_at: i64,
    pub body: String,
}

/// A stored status message: what the client sent and when the site received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusMessageRecord {
    pub message: StatusRow,
    pub received_at: i64,
}

/// One line of the audit log (table `audit_log`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub id: i64,
    pub at: i64,
    pub actor: String,
    /// e.g. `site.init`, `certificate.add`, `bulk_token.block`.
    pub action: String,
    /// What the action was applied to: a site code, thumbprint or GUID.
    pub target: String,
    pub detail: String,
}

pub(crate) fn get<'r, T>(row: &'r AnyRow, column: &'static str) -> Result<T>
where
    T: Decode<'r, Any> + Type<Any>,
{
    row.try_get(column).map_err(|e| StoreError::Corrupt {
        column,
        detail: e.to_string(),
    })
}

/// Flags are BOOLEAN on PostgreSQL but INTEGER on SQLite, where sqlx's `Any` driver cannot
/// decode a BOOLEAN column; accept either.
fn get_flag(row: &AnyRow, column: &'static str) -> Result<bool> {
    row.try_get::<bool, _>(column)
        .or_else(|_| row.try_get::<i64, _>(column).map(|v| v != 0))
        .map_err(|e| StoreError::Corrupt {
            column,
            detail: e.to_string(),
        })
}

fn parse_uuid(text: &str, column: &'static str) -> Result<Uuid> {
    Uuid::parse_str(text).map_err(|e| StoreError::Corrupt {
        column,
        detail: format!("`{text}` is not a GUID: {e}"),
    })
}

pub(crate) fn get_uuid(row: &AnyRow, column: &'static str) -> Result<Uuid> {
    parse_uuid(&get::<String>(row, column)?, column)
}

fn get_named<T: Copy>(
    row: &AnyRow,
    column: &'static str,
    all: &[T],
    name: impl Fn(T) -> &'static str,
) -> Result<T> {
    let text: String = get(row, column)?;
    all.iter()
        .copied()
        .find(|v| name(*v) == text)
        .ok_or_else(|| StoreError::Corrupt {
            column,
            detail: format!("unknown value `{text}`"),
        })
}

impl SiteRecord {
    pub(crate) fn from_row(row: &AnyRow) -> Result<Self> {
        Ok(SiteRecord {
            site_code: get(row, "site_code")?,
            hierarchy_id: get_uuid(row, "hierarchy_id")?,
            created_at: get(row, "created_at")?,
            token_key_alg: get(row, "token_key_alg")?,
        })
    }
}

impl CertificateRecord {
    pub(crate) fn from_row(row: &AnyRow) -> Result<Self> {
        Ok(CertificateRecord {
            thumbprint_sha256: get(row, "thumbprint_sha256")?,
            thumbprint_sha1: get(row, "thumbprint_sha1")?,
            purpose: get_named(row, "purpose", &CertPurpose::ALL, CertPurpose::as_str)?,
            subject: get(row, "subject")?,
            not_before: get(row, "not_before")?,
            not_after: get(row, "not_after")?,
            status: get_named(row, "status", &CertStatus::ALL, CertStatus::as_str)?,
            key_alg: get(row, "key_alg")?,
            cert_der: get(row, "cert_der")?,
            created_at: get(row, "created_at")?,
            retire_after: get(row, "retire_after")?,
        })
    }
}

impl ConnectionPointRecord {
    pub(crate) fn from_row(row: &AnyRow) -> Result<Self> {
        Ok(ConnectionPointRecord {
            name: get(row, "name")?,
            thumbprint_sha256: get(row, "thumbprint_sha256")?,
            created_at: get(row, "created_at")?,
            created_by: get(row, "created_by")?,
        })
    }
}

impl BulkTokenRecord {
    pub(crate) fn from_row(row: &AnyRow) -> Result<Self> {
        Ok(BulkTokenRecord {
            id: get_uuid(row, "id")?,
            valid_from: get(row, "valid_from")?,
            valid_until: get(row, "valid_until")?,
            created_at: get(row, "created_at")?,
            created_by: get(row, "created_by")?,
            blocked: get_flag(row, "blocked")?,
        })
    }
}

impl DeviceRecord {
    pub(crate) fn from_row(row: &AnyRow) -> Result<Self> {
        let bulk_token_id: Option<String> = get(row, "bulk_token_id")?;
        Ok(DeviceRecord {
            client_id: get(row, "client_id")?,
            hardware_id: get(row, "hardware_id")?,
            cert_thumbprint: get(row, "cert_thumbprint")?,
            hostname: get(row, "hostname")?,
            os: get(row, "os")?,
            agent_version: get(row, "agent_version")?,
            registered_via: get(row, "registered_via")?,
            bulk_token_id: bulk_token_id
                .map(|id| parse_uuid(&id, "bulk_token_id"))
                .transpose()?,
            approved: get_flag(row, "approved")?,
            blocked: get_flag(row, "blocked")?,
            registered_at: get(row, "registered_at")?,
            last_seen_at: get(row, "last_seen_at")?,
            last_seen_via: get(row, "last_seen_via")?,
        })
    }
}

impl AuditEntry {
    pub(crate) fn from_row(row: &AnyRow) -> Result<Self> {
        Ok(AuditEntry {
            id: get(row, "id")?,
            at: get(row, "at")?,
            actor: get(row, "actor")?,
            action: get(row, "action")?,
            target: get(row, "target")?,
            detail: get(row, "detail")?,
        })
    }
}

impl DeviceConflict {
    pub(crate) fn from_row(row: &AnyRow) -> Result<Self> {
        Ok(DeviceConflict {
            new_client_id: get(row, "new_client_id")?,
            existing_client_id: get(row, "existing_client_id")?,
            detected_at: get(row, "detected_at")?,
            resolved_at: get(row, "resolved_at")?,
            resolution: get(row, "resolution")?,
        })
    }
}

impl MpRecord {
    pub(crate) fn from_row(row: &AnyRow) -> Result<Self> {
        Ok(MpRecord {
            role_id: get(row, "role_id")?,
            name: get(row, "name")?,
            url: get(row, "url")?,
            allow_cmg_traffic: get_flag(row, "allow_cmg_traffic")?,
            created_at: get(row, "created_at")?,
        })
    }
}

impl CmgRecord {
    pub(crate) fn from_row(row: &AnyRow) -> Result<Self> {
        Ok(CmgRecord {
            name: get(row, "name")?,
            fqdn: get(row, "fqdn")?,
            instances: get(row, "instances")?,
            definition: get(row, "definition")?,
            created_at: get(row, "created_at")?,
            updated_at: get(row, "updated_at")?,
        })
    }
}

impl StatusRow {
    pub(crate) fn from_row(row: &AnyRow) -> Result<Self> {
        Ok(StatusRow {
            message_id: get(row, "message_id")?,
            kind: get(row, "kind")?,
            sent_at: get(row, "sent_at")?,
            body: get(row, "body")?,
        })
    }
}

impl StatusMessageRecord {
    pub(crate) fn from_row(row: &AnyRow) -> Result<Self> {
        Ok(StatusMessageRecord {
            message: StatusRow::from_row(row)?,
            received_at: get(row, "received_at")?,
        })
    }
}
