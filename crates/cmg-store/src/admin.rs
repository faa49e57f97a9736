//! The site, its certificates, bulk tokens, the audit log and the change version: everything an
//! admin changes. Each change runs in one transaction together with its audit entry and the
//! change-version bump.

use std::sync::Arc;

use sqlx::AnyConnection;
use uuid::Uuid;

use crate::error::is_unique_violation;
use crate::records::{get, get_uuid};
use crate::{
    AuditEntry, BulkTokenRecord, CertStatus, CertificateRecord, ConnectionPointRecord, Result,
    SiteRecord, Store, StoreError, now,
};

/// Writes the audit entry of a change and bumps the change version, inside the change's
/// transaction.
pub(crate) async fn audited(
    conn: &mut AnyConnection,
    actor: &str,
    action: &str,
    target: &str,
    detail: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO audit_log (at, actor, action, target, detail) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(now())
    .bind(actor)
    .bind(action)
    .bind(target)
    .bind(detail)
    .execute(&mut *conn)
    .await
    .map_err(StoreError::while_("writing the audit log"))?;
    sqlx::query("UPDATE change_version SET version = version + 1 WHERE id = 1")
        .execute(&mut *conn)
        .await
        .map_err(StoreError::while_("bumping the change version"))?;
    Ok(())
}

async fn insert_certificate(conn: &mut AnyConnection, cert: &CertificateRecord) -> Result<()> {
    sqlx::query(
        "INSERT INTO certificates (thumbprint_sha256, thumbprint_sha1, purpose, subject, \
         not_before, not_after, status, key_alg, cert_der, created_at, retire_after) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(&cert.thumbprint_sha256)
    .bind(&cert.thumbprint_sha1)
    .bind(cert.purpose.as_str())
    .bind(&cert.subject)
    .bind(cert.not_before)
    .bind(cert.not_after)
    .bind(cert.status.as_str())
    .bind(&cert.key_alg)
    .bind(cert.cert_der.as_slice())
    .bind(cert.created_at)
    .bind(cert.retire_after)
    .execute(conn)
    .await
    .map(drop)
    .map_err(|e| {
        if is_unique_violation(&e) {
            StoreError::AlreadyExists {
                what: "certificate",
                id: cert.thumbprint_sha256.clone(),
            }
        } else {
            StoreError::database("adding a certificate", Arc::new(e))
        }
    })
}

fn describe_retire_after(retire_after: Option<i64>) -> String {
    retire_after.map_or_else(
        || "retire after: never".to_owned(),
        |t| format!("retire after {t}"),
    )
}

impl Store {
    /// The site, or `None` before `cmg site init`.
    pub async fn site(&self) -> Result<Option<SiteRecord>> {
        sqlx::query("SELECT site_code, hierarchy_id, created_at, token_key_alg FROM site")
            .fetch_optional(&self.db().pool)
            .await
            .map_err(StoreError::while_("reading the site"))?
            .map(|row| SiteRecord::from_row(&row))
            .transpose()
    }

    /// Records a new site and its certificates in one transaction.
    /// Fails with [`StoreError::SiteExists`], changing nothing, when the database already holds one.
    pub async fn init_site(
        &self,
        site: &SiteRecord,
        certificates: &[CertificateRecord],
        actor: &str,
    ) -> Result<()> {
        let mut tx = self
            .db()
            .begin_write()
            .await
            .map_err(StoreError::while_("initialising the site"))?;
        // The single-row `site` table (id is always 1) makes a second site a key conflict, even
        // when two processes race.
        sqlx::query(
            "INSERT INTO site (id, site_code, hierarchy_id, created_at, token_key_alg) \
             VALUES (1, $1, $2, $3, $4)",
        )
        .bind(&site.site_code)
        .bind(site.hierarchy_id.to_string())
        .bind(site.created_at)
        .bind(&site.token_key_alg)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::SiteExists
            } else {
                StoreError::database("initialising the site", Arc::new(e))
            }
        })?;
        for cert in certificates {
            insert_certificate(&mut tx, cert).await?;
        }
        let detail = format!(
            "hierarchy {}, {} certificates, token key {}",
            site.hierarchy_id,
            certificates.len(),
            site.token_key_alg
        );
        audited(&mut tx, actor, "site.init", &site.site_code, &detail).await?;
        tx.commit()
            .await
            .map_err(StoreError::while_("initialising the site"))
    }

    /// Every site certificate, oldest first.
    pub async fn certificates(&self) -> Result<Vec<CertificateRecord>> {
        sqlx::query(
            "SELECT thumbprint_sha256, thumbprint_sha1, purpose, subject, not_before, not_after, \
             status, key_alg, cert_der, created_at, retire_after \
             FROM certificates ORDER BY created_at, thumbprint_sha256",
        )
        .fetch_all(&self.db().pool)
        .await
        .map_err(StoreError::while_("reading the certificates"))?
        .iter()
        .map(CertificateRecord::from_row)
        .collect()
    }

    /// Adds a certificate (e.g. a new token signing certificate during key rotation).
    pub async fn add_certificate(&self, cert: &CertificateRecord, actor: &str) -> Result<()> {
        let mut tx = self
            .db()
            .begin_write()
            .await
            .map_err(StoreError::while_("adding a certificate"))?;
        insert_certificate(&mut tx, cert).await?;
        let detail = format!("{} {}", cert.purpose.as_str(), cert.subject);
        audited(
            &mut tx,
            actor,
            "certificate.add",
            &cert.thumbprint_sha256,
            &detail,
        )
        .await?;
        tx.commit()
            .await
            .map_err(StoreError::while_("adding a certificate"))
    }

    /// Sets (or clears) when the certificate `thumbprint_sha256` may stop being published.
    pub async fn set_certificate_retire_after(
        &self,
        thumbprint_sha256: &str,
        retire_after: Option<i64>,
        actor: &str,
    ) -> Result<()> {
        self.update_certificate(
            "UPDATE certificates SET retire_after = $1 WHERE thumbprint_sha256 = $2",
            retire_after,
            thumbprint_sha256,
            actor,
            "certificate.retire_after",
            &describe_retire_after(retire_after),
        )
        .await
    }

    /// Marks the certificate `thumbprint_sha256` active or retired.
    pub async fn set_certificate_status(
        &self,
        thumbprint_sha256: &str,
        status: CertStatus,
        actor: &str,
    ) -> Result<()> {
        self.update_certificate(
            "UPDATE certificates SET status = $1 WHERE thumbprint_sha256 = $2",
            status.as_str(),
            thumbprint_sha256,
            actor,
            "certificate.status",
            status.as_str(),
        )
        .await
    }

    /// Records a connection point for another host together with its certificate, in one
    /// transaction: from the next change poll on, management points believe device identities
    /// relayed by that certificate. [`StoreError::AlreadyExists`] when a connection point of that
    /// name exists, whatever its case.
    pub async fn add_connection_point(
        &self,
        name: &str,
        cert: &CertificateRecord,
        actor: &str,
    ) -> Result<ConnectionPointRecord> {
        let failed = || StoreError::while_("adding a connection point");
        let record = ConnectionPointRecord {
            name: name.to_owned(),
            thumbprint_sha256: cert.thumbprint_sha256.clone(),
            created_at: now(),
            created_by: actor.to_owned(),
        };
        let mut tx = self.db().begin_write().await.map_err(failed())?;
        insert_certificate(&mut tx, cert).await?;
        sqlx::query(
            "INSERT INTO connection_points \
             (name_key, name, thumbprint_sha256, created_at, created_by) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(name.to_lowercase())
        .bind(&record.name)
        .bind(&record.thumbprint_sha256)
        .bind(record.created_at)
        .bind(&record.created_by)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::AlreadyExists {
                    what: "connection point",
                    id: name.to_owned(),
                }
            } else {
                StoreError::database("adding a connection point", Arc::new(e))
            }
        })?;
        let detail = format!("certificate {} {}", cert.thumbprint_sha256, cert.subject);
        audited(&mut tx, actor, "connection_point.add", name, &detail).await?;
        tx.commit().await.map_err(failed())?;
        Ok(record)
    }

    /// Connection points added for other hosts, oldest first.
    pub async fn connection_points(&self) -> Result<Vec<ConnectionPointRecord>> {
        sqlx::query(
            "SELECT name, thumbprint_sha256, created_at, created_by FROM connection_points \
             ORDER BY created_at, name_key",
        )
        .fetch_all(&self.db().pool)
        .await
        .map_err(StoreError::while_("reading the connection points"))?
        .iter()
        .map(ConnectionPointRecord::from_row)
        .collect()
    }

    /// Removes the connection point `name` (any case) and retires its certificate, in one
    /// transaction: management points stop believing what it relays at their next change poll.
    pub async fn remove_connection_point(
        &self,
        name: &str,
        actor: &str,
    ) -> Result<ConnectionPointRecord> {
        let failed = || StoreError::while_("removing a connection point");
        let not_found = || StoreError::NotFound {
            what: "connection point",
            id: name.to_owned(),
        };
        let key = name.to_lowercase();
        let mut tx = self.db().begin_write().await.map_err(failed())?;
        let record = sqlx::query(
            "SELECT name, thumbprint_sha256, created_at, created_by FROM connection_points \
             WHERE name_key = $1",
        )
        .bind(&key)
        .fetch_optional(&mut *tx)
        .await
        .map_err(failed())?
        .map(|row| ConnectionPointRecord::from_row(&row))
        .transpose()?
        .ok_or_else(not_found)?;
        let deleted = sqlx::query("DELETE FROM connection_points WHERE name_key = $1")
            .bind(&key)
            .execute(&mut *tx)
            .await
            .map_err(failed())?
            .rows_affected();
        if deleted == 0 {
            // Removed by another process since the SELECT (PostgreSQL, read committed).
            return Err(not_found());
        }
        sqlx::query("UPDATE certificates SET status = $1 WHERE thumbprint_sha256 = $2")
            .bind(CertStatus::Retired.as_str())
            .bind(&record.thumbprint_sha256)
            .execute(&mut *tx)
            .await
            .map_err(failed())?;
        let detail = format!("certificate {} retired", record.thumbprint_sha256);
        audited(
            &mut tx,
            actor,
            "connection_point.remove",
            &record.name,
            &detail,
        )
        .await?;
        tx.commit().await.map_err(failed())?;
        Ok(record)
    }

    /// Runs `sql` (`$1` = `value`, `$2` = the thumbprint) with its audit entry.
    async fn update_certificate<'v, V>(
        &self,
        sql: &'static str,
        value: V,
        thumbprint_sha256: &str,
        actor: &str,
        action: &str,
        detail: &str,
    ) -> Result<()>
    where
        V: sqlx::Encode<'v, sqlx::Any> + sqlx::Type<sqlx::Any> + 'v,
    {
        let failed = || StoreError::while_("changing a certificate");
        let mut tx = self.db().begin_write().await.map_err(failed())?;
        let changed = sqlx::query(sql)
            .bind(value)
            .bind(thumbprint_sha256)
            .execute(&mut *tx)
            .await
            .map_err(failed())?
            .rows_affected();
        if changed == 0 {
            return Err(StoreError::NotFound {
                what: "certificate",
                id: thumbprint_sha256.to_owned(),
            });
        }
        audited(&mut tx, actor, action, thumbprint_sha256, detail).await?;
        tx.commit().await.map_err(failed())
    }

    /// Records a newly minted bulk registration token (its tracking data only, never the token).
    pub async fn record_bulk_token(&self, token: &BulkTokenRecord) -> Result<()> {
        let failed = || StoreError::while_("recording a bulk token");
        let mut tx = self.db().begin_write().await.map_err(failed())?;
        let id = token.id.to_string();
        sqlx::query(
            "INSERT INTO bulk_tokens (id, valid_from, valid_until, created_at, created_by, blocked) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&id)
        .bind(token.valid_from)
        .bind(token.valid_until)
        .bind(token.created_at)
        .bind(&token.created_by)
        .bind(token.blocked)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::AlreadyExists {
                    what: "bulk token",
                    id: id.clone(),
                }
            } else {
                StoreError::database("recording a bulk token", Arc::new(e))
            }
        })?;
        let detail = format!(
            "valid from {} until {}",
            token.valid_from, token.valid_until
        );
        audited(
            &mut tx,
            &token.created_by,
            "bulk_token.create",
            &id,
            &detail,
        )
        .await?;
        tx.commit().await.map_err(failed())
    }

    /// Every bulk token, oldest first.
    pub async fn bulk_tokens(&self) -> Result<Vec<BulkTokenRecord>> {
        sqlx::query(
            "SELECT id, valid_from, valid_until, created_at, created_by, blocked \
             FROM bulk_tokens ORDER BY created_at, id",
        )
        .fetch_all(&self.db().pool)
        .await
        .map_err(StoreError::while_("reading the bulk tokens"))?
        .iter()
        .map(BulkTokenRecord::from_row)
        .collect()
    }

    pub async fn bulk_token(&self, id: Uuid) -> Result<Option<BulkTokenRecord>> {
        sqlx::query(
            "SELECT id, valid_from, valid_until, created_at, created_by, blocked \
             FROM bulk_tokens WHERE id = $1",
        )
        .bind(id.to_string())
        .fetch_optional(&self.db().pool)
        .await
        .map_err(StoreError::while_("reading a bulk token"))?
        .map(|row| BulkTokenRecord::from_row(&row))
        .transpose()
    }

    /// Blocks or unblocks the bulk token `id`; returns its updated record.
    pub async fn set_bulk_token_blocked(
        &self,
        id: Uuid,
        blocked: bool,
        actor: &str,
    ) -> Result<BulkTokenRecord> {
        let failed = || StoreError::while_("blocking or unblocking a bulk token");
        let mut tx = self.db().begin_write().await.map_err(failed())?;
        let row = sqlx::query(
            "UPDATE bulk_tokens SET blocked = $1 WHERE id = $2 \
             RETURNING id, valid_from, valid_until, created_at, created_by, blocked",
        )
        .bind(blocked)
        .bind(id.to_string())
        .fetch_optional(&mut *tx)
        .await
        .map_err(failed())?;
        let Some(row) = row else {
            return Err(StoreError::NotFound {
                what: "bulk token",
                id: id.to_string(),
            });
        };
        let record = BulkTokenRecord::from_row(&row)?;
        let action = if blocked {
            "bulk_token.block"
        } else {
            "bulk_token.unblock"
        };
        audited(&mut tx, actor, action, &id.to_string(), "").await?;
        tx.commit().await.map_err(failed())?;
        Ok(record)
    }

    /// The IDs of every blocked bulk token, oldest first.
    pub async fn blocked_bulk_tokens(&self) -> Result<Vec<Uuid>> {
        sqlx::query("SELECT id FROM bulk_tokens WHERE blocked ORDER BY created_at, id")
            .fetch_all(&self.db().pool)
            .await
            .map_err(StoreError::while_("reading the blocked bulk tokens"))?
            .iter()
            .map(|row| get_uuid(row, "id"))
            .collect()
    }

    /// The newest `limit` audit entries, newest first.
    pub async fn audit_log(&self, limit: u32) -> Result<Vec<AuditEntry>> {
        sqlx::query(
            "SELECT id, at, actor, action, target, detail FROM audit_log ORDER BY id DESC LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.db().pool)
        .await
        .map_err(StoreError::while_("reading the audit log"))?
        .iter()
        .map(AuditEntry::from_row)
        .collect()
    }

    /// A number that grows with every admin change, by any process sharing the database.
    /// One indexed row: cheap enough to poll every second.
    pub async fn change_version(&self) -> Result<i64> {
        let row = sqlx::query("SELECT version FROM change_version WHERE id = 1")
            .fetch_optional(&self.db().pool)
            .await
            .map_err(StoreError::while_("reading the change version"))?
            .ok_or(StoreError::Corrupt {
                column: "version",
                detail: "the change_version row is missing".to_owned(),
            })?;
        get(&row, "version")
    }
}
