//! What the admin configures besides the site's security: client settings, management points and
//! CMG definitions. Each change runs in one transaction together with its audit entry and the
//! change-version bump. The store keeps values as given; checking them is the caller's job.

use std::sync::Arc;

use crate::admin::audited;
use crate::error::is_unique_violation;
use crate::records::get;
use crate::{CmgRecord, MpRecord, Result, Store, StoreError, now};

macro_rules! mp_columns {
    () => {
        "role_id, name, url, allow_cmg_traffic, created_at"
    };
}

fn describe_mp(mp: &MpRecord) -> String {
    let traffic = if mp.allow_cmg_traffic {
        "allows CMG traffic"
    } else {
        "no CMG traffic"
    };
    format!("{} {}, {traffic}", mp.name, mp.url)
}

fn describe_cmg(cmg: &CmgRecord) -> String {
    format!("{}, {} instances", cmg.fqdn, cmg.instances)
}

impl Store {
    /// Every client setting as (name, value), by name.
    pub async fn settings(&self) -> Result<Vec<(String, String)>> {
        sqlx::query("SELECT name, value FROM client_settings ORDER BY name")
            .fetch_all(&self.db().pool)
            .await
            .map_err(StoreError::while_("reading the client settings"))?
            .iter()
            .map(|row| Ok((get(row, "name")?, get(row, "value")?)))
            .collect()
    }

    /// Sets the client setting `name` to `value`, adding it if missing.
    pub async fn set_setting(&self, name: &str, value: &str, actor: &str) -> Result<()> {
        let failed = || StoreError::while_("changing a client setting");
        let mut tx = self.db().begin_write().await.map_err(failed())?;
        sqlx::query(
            "INSERT INTO client_settings (name, value, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
        )
        .bind(name)
        .bind(value)
        .bind(now())
        .execute(&mut *tx)
        .await
        .map_err(failed())?;
        audited(&mut tx, actor, "settings.set", name, value).await?;
        tx.commit().await.map_err(failed())
    }

    /// Every management point, by role ID.
    pub async fn management_points(&self) -> Result<Vec<MpRecord>> {
        sqlx::query(concat!(
            "SELECT ",
            mp_columns!(),
            " FROM management_points ORDER BY role_id"
        ))
        .fetch_all(&self.db().pool)
        .await
        .map_err(StoreError::while_("reading the management points"))?
        .iter()
        .map(MpRecord::from_row)
        .collect()
    }

    /// Adds a management point; [`StoreError::AlreadyExists`] when its role ID is taken.
    pub async fn add_management_point(&self, mp: &MpRecord, actor: &str) -> Result<()> {
        let failed = || StoreError::while_("adding a management point");
        let mut tx = self.db().begin_write().await.map_err(failed())?;
        let role_id = mp.role_id.to_string();
        sqlx::query(concat!(
            "INSERT INTO management_points (",
            mp_columns!(),
            ") VALUES ($1, $2, $3, $4, $5)"
        ))
        .bind(mp.role_id)
        .bind(mp.name.as_str())
        .bind(mp.url.as_str())
        .bind(mp.allow_cmg_traffic)
        .bind(mp.created_at)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::AlreadyExists {
                    what: "management point",
                    id: role_id.clone(),
                }
            } else {
                StoreError::database("adding a management point", Arc::new(e))
            }
        })?;
        audited(&mut tx, actor, "mp.add", &role_id, &describe_mp(mp)).await?;
        tx.commit().await.map_err(failed())
    }

    /// Changes the URL and/or whether CMG traffic is allowed (`None` keeps the value) of the
    /// management point `role_id`; returns its updated record.
    pub async fn set_management_point(
        &self,
        role_id: i64,
        url: Option<&str>,
        allow_cmg_traffic: Option<bool>,
        actor: &str,
    ) -> Result<MpRecord> {
        let failed = || StoreError::while_("changing a management point");
        let mut tx = self.db().begin_write().await.map_err(failed())?;
        let row = sqlx::query(concat!(
            "UPDATE management_points \
             SET url = COALESCE($1, url), allow_cmg_traffic = COALESCE($2, allow_cmg_traffic) \
             WHERE role_id = $3 RETURNING ",
            mp_columns!()
        ))
        .bind(url)
        .bind(allow_cmg_traffic)
        .bind(role_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(failed())?
        .ok_or_else(|| StoreError::NotFound {
            what: "management point",
            id: role_id.to_string(),
        })?;
        let mp = MpRecord::from_row(&row)?;
        audited(
            &mut tx,
            actor,
            "mp.set",
            &role_id.to_string(),
            &describe_mp(&mp),
        )
        .await?;
        tx.commit().await.map_err(failed())?;
        Ok(mp)
    }

    /// Every CMG definition, by name.
    pub async fn cmgs(&self) -> Result<Vec<CmgRecord>> {
        sqlx::query(
            "SELECT name, fqdn, instances, definition, created_at, updated_at \
             FROM cmgs ORDER BY name",
        )
        .fetch_all(&self.db().pool)
        .await
        .map_err(StoreError::while_("reading the CMG definitions"))?
        .iter()
        .map(CmgRecord::from_row)
        .collect()
    }

    /// Creates the CMG `cmg.name`, or replaces its definition if it exists (keeping its
    /// `created_at`).
    pub async fn put_cmg(&self, cmg: &CmgRecord, actor: &str) -> Result<()> {
        let failed = || StoreError::while_("saving a CMG definition");
        let mut tx = self.db().begin_write().await.map_err(failed())?;
        let created = sqlx::query(
            "INSERT INTO cmgs (name, fqdn, instances, definition, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO NOTHING",
        )
        .bind(cmg.name.as_str())
        .bind(cmg.fqdn.as_str())
        .bind(cmg.instances)
        .bind(cmg.definition.as_str())
        .bind(cmg.created_at)
        .bind(cmg.updated_at)
        .execute(&mut *tx)
        .await
        .map_err(failed())?
        .rows_affected()
            > 0;
        let action = if created {
            "cmg.create"
        } else {
            sqlx::query(
                "UPDATE cmgs SET fqdn = $1, instances = $2, definition = $3, updated_at = $4 \
                 WHERE name = $5",
            )
            .bind(cmg.fqdn.as_str())
            .bind(cmg.instances)
            .bind(cmg.definition.as_str())
            .bind(cmg.updated_at)
            .bind(cmg.name.as_str())
            .execute(&mut *tx)
            .await
            .map_err(failed())?;
            "cmg.modify"
        };
        audited(&mut tx, actor, action, &cmg.name, &describe_cmg(cmg)).await?;
        tx.commit().await.map_err(failed())
    }

    /// Deletes the CMG definition `name`.
    pub async fn delete_cmg(&self, name: &str, actor: &str) -> Result<()> {
        let failed = || StoreError::while_("deleting a CMG definition");
        let mut tx = self.db().begin_write().await.map_err(failed())?;
        let deleted = sqlx::query("DELETE FROM cmgs WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(failed())?
            .rows_affected();
        if deleted == 0 {
            return Err(StoreError::NotFound {
                what: "CMG",
                id: name.to_owned(),
            });
        }
        audited(&mut tx, actor, "cmg.delete", name, "").await?;
        tx.commit().await.map_err(failed())
    }
}
