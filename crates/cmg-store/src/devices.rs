//! Devices, and the grouped-commit writer that registers them (DESIGN §9).
//!
//! A registration wave is bound by the fsync of each commit. [`Store::insert_device`] therefore
//! hands its row to one writer task, which takes the first queued row plus every row already
//! queued behind it (up to [`MAX_BATCH`]), inserts them with one multi-row INSERT in one
//! transaction, commits, and only then answers each caller. While a batch commits the next one
//! queues up, so the batch size adapts to the load with no added latency when idle.
//! [`Store::insert_conflicting_device`] goes through the same writer: its conflict row is written
//! in the same transaction as its device row.
//!
//! Everything else here changes one device at a time: admin changes (block, approve, merge,
//! certificate take-over) are audited and bump the change version; routine updates by the MP
//! (re-registration with the same certificate, last seen) are not.

use std::fmt::Write;
use std::slice;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::any::AnyArguments;
use sqlx::query::Query;
use sqlx::{Any, AnyConnection, AssertSqlSafe};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::admin::audited;
use crate::error::{is_foreign_key_violation, is_row_violation, is_unique_violation};
use crate::records::get;
use crate::{Backend, Db, DeviceConflict, DeviceRecord, Result, Store, StoreError, now};

/// Most rows per transaction. Measured with 1000 concurrent registrations (cmg-bench `store`),
/// 1024 beat 256 by ~10 % on both backends; and 1024 rows × 13 columns stays under both
/// backends' limit on bound parameters per statement (SQLite 32766, PostgreSQL 65535), so a
/// batch is always one statement.
const MAX_BATCH: usize = 1024;
const DEVICE_COLUMNS: usize = 13;
const CONFLICT_COLUMNS: usize = 3;
const _: () = assert!(MAX_BATCH * DEVICE_COLUMNS <= 32766);

/// Rows waiting for the writer; beyond this callers wait to enqueue (back-pressure).
const QUEUE: usize = 4 * MAX_BATCH;

/// The columns of a [`DeviceRecord`], for SELECT and RETURNING.
macro_rules! device_columns {
    () => {
        "client_id, hardware_id, cert_thumbprint, hostname, os, agent_version, registered_via, \
         bulk_token_id, approved, blocked, registered_at, last_seen_at, last_seen_via"
    };
}

macro_rules! select_devices {
    ($tail:literal) => {
        concat!("SELECT ", device_columns!(), " FROM devices ", $tail)
    };
}

macro_rules! select_conflicts {
    ($tail:literal) => {
        concat!(
            "SELECT new_client_id, existing_client_id, detected_at, resolved_at, resolution \
             FROM device_conflicts ",
            $tail
        )
    };
}

/// Records that the device `$3` was seen at `$1` through `$2` (e.g. `CMG`). Never moves back in
/// time: of two requests racing, the later one's time stays.
const MARK_SEEN: &str = "UPDATE devices SET \
     last_seen_at = CASE WHEN last_seen_at > $1 THEN last_seen_at ELSE $1 END, \
     last_seen_via = CASE WHEN last_seen_at > $1 THEN last_seen_via ELSE $2 END \
     WHERE client_id = $3";

/// Runs [`MARK_SEEN`]; `false` when there is no device `client_id`.
pub(crate) async fn mark_seen(
    conn: &mut AnyConnection,
    client_id: &str,
    at: i64,
    via: &str,
) -> Result<bool, sqlx::Error> {
    let changed = sqlx::query(MARK_SEEN)
        .bind(at)
        .bind(via)
        .bind(client_id)
        .execute(conn)
        .await?
        .rows_affected();
    Ok(changed > 0)
}

fn device_not_found(client_id: &str) -> StoreError {
    StoreError::NotFound {
        what: "device",
        id: client_id.to_owned(),
    }
}

/// The record a conflicting registration conflicts with (table `device_conflicts`).
struct Conflict {
    existing_client_id: String,
    detected_at: i64,
}

struct Pending {
    device: DeviceRecord,
    /// Set by [`Store::insert_conflicting_device`]; written in the device row's transaction.
    conflict: Option<Conflict>,
    reply: oneshot::Sender<Result<()>>,
}

#[expect(
    clippy::large_enum_variant,
    reason = "nearly every message is an Insert; boxing it would only add an allocation per row"
)]
enum Msg {
    Insert(Pending),
    /// Stop accepting rows; answered (by dropping the sender) once the queue is written.
    Close(oneshot::Sender<()>),
}

/// The handle to the writer task. The task ends when every handle is dropped or on `close`,
/// after writing what is queued.
pub(crate) struct Writer {
    queue: mpsc::Sender<Msg>,
    commits: Arc<AtomicU64>,
}

impl Writer {
    pub(crate) fn start(db: Db) -> Writer {
        let (queue, rx) = mpsc::channel(QUEUE);
        let commits = Arc::new(AtomicU64::new(0));
        tokio::spawn(run(db, rx, Arc::clone(&commits)));
        Writer { queue, commits }
    }

    pub(crate) async fn close(&self) {
        let (done, finished) = oneshot::channel();
        if self.queue.send(Msg::Close(done)).await.is_ok() {
            // Err only means the writer is gone, which is what we wait for.
            let _ = finished.await;
        }
    }
}

async fn run(db: Db, mut rx: mpsc::Receiver<Msg>, commits: Arc<AtomicU64>) {
    let mut closers = Vec::new();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(msg) = next {
            match msg {
                Msg::Insert(pending) => batch.push(pending),
                Msg::Close(done) => {
                    // Refuse new rows; those already queued are still received and written.
                    rx.close();
                    closers.push(done);
                }
            }
            next = if batch.len() < MAX_BATCH {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if !batch.is_empty() {
            write_batch(&db, &commits, &mut batch).await;
        }
    }
    drop(closers);
}

/// Writes `batch` and answers its callers, emptying it.
async fn write_batch(db: &Db, commits: &AtomicU64, batch: &mut Vec<Pending>) {
    let result = insert_devices(db, batch).await;
    match result {
        Ok(()) => {
            commits.fetch_add(1, Ordering::Relaxed);
            for pending in batch.drain(..) {
                // A caller that gave up has dropped its receiver; its row is written regardless.
                let _ = pending.reply.send(Ok(()));
            }
        }
        Err(e) if batch.len() > 1 && is_row_violation(&e) => {
            // One row broke a constraint and rolled back the whole batch: retry the rows one per
            // transaction so that only the offending callers fail.
            tracing::debug!(rows = batch.len(), error = %e, "device batch failed; retrying row by row");
            for pending in batch.drain(..) {
                let result = insert_devices(db, slice::from_ref(&pending)).await;
                if result.is_ok() {
                    commits.fetch_add(1, Ordering::Relaxed);
                }
                let result = result.map_err(|e| device_error(&Arc::new(e), &pending));
                let _ = pending.reply.send(result);
            }
        }
        Err(e) => {
            tracing::warn!(rows = batch.len(), error = %e, "cannot write registered devices");
            let e = Arc::new(e);
            for pending in batch.drain(..) {
                let error = device_error(&e, &pending);
                let _ = pending.reply.send(Err(error));
            }
        }
    }
}

fn device_error(e: &Arc<sqlx::Error>, pending: &Pending) -> StoreError {
    if is_unique_violation(e) {
        StoreError::DeviceExists(pending.device.client_id.clone())
    } else if let Some(conflict) = &pending.conflict
        && is_foreign_key_violation(e)
    {
        // The only foreign key of the two tables: the record it conflicts with is gone.
        device_not_found(&conflict.existing_client_id)
    } else {
        StoreError::database("registering devices", Arc::clone(e))
    }
}

/// `VALUES (…), (…)…`: the parameters of `rows` rows of `columns` values each.
fn values(backend: Backend, rows: usize, columns: usize) -> String {
    let mut sql = String::from(" VALUES ");
    for row in 0..rows {
        sql.push_str(if row == 0 { "(" } else { ", (" });
        for column in 0..columns {
            if column > 0 {
                sql.push_str(", ");
            }
            match backend {
                // Not `$N`: SQLite finds named parameters by a linear scan, which makes preparing
                // and binding a statement with thousands of them quadratic (measured: ~0.25 s
                // for 500 rows).
                Backend::Sqlite => sql.push('?'),
                Backend::Postgres => {
                    let _ = write!(sql, "${}", row * columns + column + 1);
                }
            }
        }
        sql.push(')');
    }
    sql
}

/// Inserts `rows` in one transaction: one statement for the devices, and one for the conflicts
/// among them, if any.
async fn insert_devices(db: &Db, rows: &[Pending]) -> Result<(), sqlx::Error> {
    let sql = String::from(
        "INSERT INTO devices (client_id, hardware_id, cert_thumbprint, hostname, os, \
         agent_version, registered_via, bulk_token_id, approved, blocked, registered_at, \
         last_seen_at, last_seen_via)",
    ) + &values(db.backend, rows.len(), DEVICE_COLUMNS);
    // Not kept as prepared statements: their text varies with the batch size.
    let mut query: Query<'_, Any, AnyArguments> = sqlx::query(AssertSqlSafe(sql)).persistent(false);
    for Pending { device: d, .. } in rows {
        query = query
            .bind(d.client_id.as_str())
            .bind(d.hardware_id.as_str())
            .bind(d.cert_thumbprint.as_str())
            .bind(d.hostname.as_str())
            .bind(d.os.as_str())
            .bind(d.agent_version.as_str())
            .bind(d.registered_via.as_str())
            .bind(d.bulk_token_id.map(|id| id.to_string()))
            .bind(d.approved)
            .bind(d.blocked)
            .bind(d.registered_at)
            .bind(d.last_seen_at)
            .bind(d.last_seen_via.as_deref());
    }

    let conflicts: Vec<_> = rows
        .iter()
        .filter_map(|p| Some((p.device.client_id.as_str(), p.conflict.as_ref()?)))
        .collect();
    let conflicts = (!conflicts.is_empty()).then(|| {
        let sql = String::from(
            "INSERT INTO device_conflicts (new_client_id, existing_client_id, detected_at)",
        ) + &values(db.backend, conflicts.len(), CONFLICT_COLUMNS);
        let mut query: Query<'_, Any, AnyArguments> =
            sqlx::query(AssertSqlSafe(sql)).persistent(false);
        for (client_id, conflict) in conflicts {
            query = query
                .bind(client_id)
                .bind(conflict.existing_client_id.as_str())
                .bind(conflict.detected_at);
        }
        query
    });

    let mut tx = db.begin_write().await?;
    query.execute(&mut *tx).await?;
    if let Some(conflicts) = conflicts {
        conflicts.execute(&mut *tx).await?;
    }
    tx.commit().await
}

impl Store {
    /// Registers a device. Returns once its row is committed (grouped with concurrent
    /// registrations into one transaction); [`StoreError::DeviceExists`] when the client ID is
    /// taken. If the caller stops waiting, the row may still be written.
    pub async fn insert_device(&self, device: DeviceRecord) -> Result<()> {
        self.queue_device(device, None).await
    }

    /// Registers a device whose hardware ID matched the existing record `existing_client_id`,
    /// and records the conflict for an admin to [merge](Store::merge_device_conflict) — both in
    /// one transaction, grouped like [`Store::insert_device`]. Fails as `insert_device` does, and
    /// with [`StoreError::NotFound`] when there is no device `existing_client_id`.
    pub async fn insert_conflicting_device(
        &self,
        device: DeviceRecord,
        existing_client_id: &str,
    ) -> Result<()> {
        let conflict = Conflict {
            existing_client_id: existing_client_id.to_owned(),
            detected_at: now(),
        };
        self.queue_device(device, Some(conflict)).await
    }

    async fn queue_device(&self, device: DeviceRecord, conflict: Option<Conflict>) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.inner
            .writer
            .queue
            .send(Msg::Insert(Pending {
                device,
                conflict,
                reply,
            }))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// How many transactions the device writer has committed: with grouped commits, fewer than
    /// the devices it inserted.
    pub fn commit_batches(&self) -> u64 {
        self.inner.writer.commits.load(Ordering::Relaxed)
    }

    pub async fn device(&self, client_id: &str) -> Result<Option<DeviceRecord>> {
        sqlx::query(select_devices!("WHERE client_id = $1"))
            .bind(client_id)
            .fetch_optional(&self.db().pool)
            .await
            .map_err(StoreError::while_("reading a device"))?
            .map(|row| DeviceRecord::from_row(&row))
            .transpose()
    }

    /// Every device, in order of registration.
    pub async fn devices(&self) -> Result<Vec<DeviceRecord>> {
        sqlx::query(select_devices!("ORDER BY registered_at, client_id"))
            .fetch_all(&self.db().pool)
            .await
            .map_err(StoreError::while_("reading the devices"))?
            .iter()
            .map(DeviceRecord::from_row)
            .collect()
    }

    /// The devices registered with hardware ID `hardware_id` (re-installs of one machine), in
    /// order of registration.
    pub async fn devices_by_hardware_id(&self, hardware_id: &str) -> Result<Vec<DeviceRecord>> {
        sqlx::query(select_devices!(
            "WHERE hardware_id = $1 ORDER BY registered_at, client_id"
        ))
        .bind(hardware_id)
        .fetch_all(&self.db().pool)
        .await
        .map_err(StoreError::while_("reading devices by hardware ID"))?
        .iter()
        .map(DeviceRecord::from_row)
        .collect()
    }

    /// The newest device record using the certificate with SHA-256 thumbprint `thumbprint`
    /// (how a PKI device is found: it has no token naming its client ID).
    pub async fn device_by_certificate(&self, thumbprint: &str) -> Result<Option<DeviceRecord>> {
        sqlx::query(select_devices!(
            "WHERE cert_thumbprint = $1 ORDER BY registered_at DESC, client_id LIMIT 1"
        ))
        .bind(thumbprint)
        .fetch_optional(&self.db().pool)
        .await
        .map_err(StoreError::while_("reading a device by certificate"))?
        .map(|row| DeviceRecord::from_row(&row))
        .transpose()
    }
}

impl Store {
    /// The conflicting registrations, oldest first: the unresolved ones, or every one.
    pub async fn device_conflicts(&self, include_resolved: bool) -> Result<Vec<DeviceConflict>> {
        let sql = if include_resolved {
            select_conflicts!("ORDER BY detected_at, new_client_id")
        } else {
            select_conflicts!("WHERE resolved_at IS NULL ORDER BY detected_at, new_client_id")
        };
        sqlx::query(sql)
            .fetch_all(&self.db().pool)
            .await
            .map_err(StoreError::while_("reading the device conflicts"))?
            .iter()
            .map(DeviceConflict::from_row)
            .collect()
    }

    /// Resolves the conflict of the record `new_client_id` as ConfigMgr's "merge" does: the
    /// existing record takes the new one's certificate (so the device keeps its client ID and
    /// history), host name, OS, agent version and, if later, its last-seen time; the new record
    /// is deleted; the conflict is kept, marked `merged`. Conflicts naming the deleted record
    /// as their existing one now name the surviving record. Returns the updated existing record;
    /// [`StoreError::NotFound`] when `new_client_id` has no unresolved conflict.
    pub async fn merge_device_conflict(
        &self,
        new_client_id: &str,
        actor: &str,
    ) -> Result<DeviceRecord> {
        let failed = || StoreError::while_("merging a device conflict");
        let mut tx = self.db().begin_write().await.map_err(failed())?;
        // Resolving first also locks the conflict: a concurrent merge then finds it resolved.
        let row = sqlx::query(
            "UPDATE device_conflicts SET resolved_at = $1, resolution = 'merged' \
             WHERE new_client_id = $2 AND resolved_at IS NULL RETURNING existing_client_id",
        )
        .bind(now())
        .bind(new_client_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(failed())?;
        let Some(row) = row else {
            return Err(StoreError::NotFound {
                what: "unresolved device conflict",
                id: new_client_id.to_owned(),
            });
        };
        let existing_client_id: String = get(&row, "existing_client_id")?;

        let new = sqlx::query(select_devices!("WHERE client_id = $1"))
            .bind(new_client_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(failed())?
            .ok_or_else(|| device_not_found(new_client_id))?;
        let new = DeviceRecord::from_row(&new)?;
        if let (Some(at), Some(via)) = (new.last_seen_at, new.last_seen_via.as_deref()) {
            mark_seen(&mut tx, &existing_client_id, at, via)
                .await
                .map_err(failed())?;
        }
        let merged = sqlx::query(concat!(
            "UPDATE devices SET cert_thumbprint = $1, hostname = $2, os = $3, agent_version = $4 \
             WHERE client_id = $5 RETURNING ",
            device_columns!()
        ))
        .bind(new.cert_thumbprint.as_str())
        .bind(new.hostname.as_str())
        .bind(new.os.as_str())
        .bind(new.agent_version.as_str())
        .bind(existing_client_id.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(failed())?
        .ok_or_else(|| device_not_found(&existing_client_id))?;
        let merged = DeviceRecord::from_row(&merged)?;

        sqlx::query(
            "UPDATE device_conflicts SET existing_client_id = $1 WHERE existing_client_id = $2",
        )
        .bind(existing_client_id.as_str())
        .bind(new_client_id)
        .execute(&mut *tx)
        .await
        .map_err(failed())?;
        sqlx::query("DELETE FROM devices WHERE client_id = $1")
            .bind(new_client_id)
            .execute(&mut *tx)
            .await
            .map_err(failed())?;
        let detail = format!(
            "merged {new_client_id} into this record (certificate {})",
            new.cert_thumbprint
        );
        audited(&mut tx, actor, "device.merge", &existing_client_id, &detail).await?;
        tx.commit().await.map_err(failed())?;
        Ok(merged)
    }

    /// Records a re-registration of the device `client_id`: the certificate it registered with
    /// and what it reported. A new certificate is a take-over of the record — audited, and it
    /// bumps the change version, since tokens bound to the old certificate stop working; the
    /// same certificate is routine and neither. [`StoreError::NotFound`] when there is no such
    /// device.
    #[expect(
        clippy::too_many_arguments,
        reason = "one value per column of the registration, as the MP has them"
    )]
    pub async fn update_device_registration(
        &self,
        client_id: &str,
        cert_thumbprint: &str,
        hostname: &str,
        os: &str,
        agent_version: &str,
        registered_via: &str,
        bulk_token_id: Option<Uuid>,
        actor: &str,
    ) -> Result<DeviceRecord> {
        let failed = || StoreError::while_("re-registering a device");
        let mut tx = self.db().begin_write().await.map_err(failed())?;
        // SQLite's BEGIN IMMEDIATE already serialises writers; PostgreSQL needs the row lock so
        // that two re-registrations racing agree on which one took the record over.
        let sql = match self.backend() {
            Backend::Sqlite => "SELECT cert_thumbprint FROM devices WHERE client_id = $1",
            Backend::Postgres => {
                "SELECT cert_thumbprint FROM devices WHERE client_id = $1 FOR UPDATE"
            }
        };
        let old = sqlx::query(sql)
            .bind(client_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(failed())?
            .ok_or_else(|| device_not_found(client_id))?;
        let old: String = get(&old, "cert_thumbprint")?;
        let row = sqlx::query(concat!(
            "UPDATE devices SET cert_thumbprint = $1, hostname = $2, os = $3, agent_version = $4, \
             registered_via = $5, bulk_token_id = $6 WHERE client_id = $7 RETURNING ",
            device_columns!()
        ))
        .bind(cert_thumbprint)
        .bind(hostname)
        .bind(os)
        .bind(agent_version)
        .bind(registered_via)
        .bind(bulk_token_id.map(|id| id.to_string()))
        .bind(client_id)
        .fetch_one(&mut *tx)
        .await
        .map_err(failed())?;
        let record = DeviceRecord::from_row(&row)?;
        if old != cert_thumbprint {
            let detail =
                format!("certificate {old} replaced by {cert_thumbprint} ({registered_via})");
            audited(
                &mut tx,
                actor,
                "device.certificate_takeover",
                client_id,
                &detail,
            )
            .await?;
        }
        tx.commit().await.map_err(failed())?;
        Ok(record)
    }

    /// Blocks or unblocks the device `client_id`; returns its updated record.
    pub async fn set_device_blocked(
        &self,
        client_id: &str,
        blocked: bool,
        actor: &str,
    ) -> Result<DeviceRecord> {
        let action = if blocked {
            "device.block"
        } else {
            "device.unblock"
        };
        self.update_device_flag(
            concat!(
                "UPDATE devices SET blocked = $1 WHERE client_id = $2 RETURNING ",
                device_columns!()
            ),
            blocked,
            client_id,
            actor,
            action,
        )
        .await
    }

    /// Approves the device `client_id`; returns its updated record.
    pub async fn approve_device(&self, client_id: &str, actor: &str) -> Result<DeviceRecord> {
        self.update_device_flag(
            concat!(
                "UPDATE devices SET approved = $1 WHERE client_id = $2 RETURNING ",
                device_columns!()
            ),
            true,
            client_id,
            actor,
            "device.approve",
        )
        .await
    }

    /// Runs `sql` (`$1` = `value`, `$2` = the client ID, returning the device) with its audit
    /// entry.
    async fn update_device_flag(
        &self,
        sql: &'static str,
        value: bool,
        client_id: &str,
        actor: &str,
        action: &str,
    ) -> Result<DeviceRecord> {
        let failed = || StoreError::while_("changing a device");
        let mut tx = self.db().begin_write().await.map_err(failed())?;
        let row = sqlx::query(sql)
            .bind(value)
            .bind(client_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(failed())?
            .ok_or_else(|| device_not_found(client_id))?;
        let record = DeviceRecord::from_row(&row)?;
        audited(&mut tx, actor, action, client_id, "").await?;
        tx.commit().await.map_err(failed())?;
        Ok(record)
    }

    /// The client IDs of every blocked device, in order of registration.
    pub async fn blocked_devices(&self) -> Result<Vec<String>> {
        sqlx::query("SELECT client_id FROM devices WHERE blocked ORDER BY registered_at, client_id")
            .fetch_all(&self.db().pool)
            .await
            .map_err(StoreError::while_("reading the blocked devices"))?
            .iter()
            .map(|row| get(row, "client_id"))
            .collect()
    }

    /// Records that the device `client_id` was seen at `at` through `via` (e.g. `CMG` or
    /// `Intranet`); an earlier time than the one recorded changes nothing. Not audited.
    /// [`StoreError::NotFound`] when there is no such device.
    pub async fn record_device_seen(&self, client_id: &str, at: i64, via: &str) -> Result<()> {
        let mut conn = self
            .db()
            .pool
            .acquire()
            .await
            .map_err(StoreError::while_("recording when a device was seen"))?;
        if mark_seen(&mut conn, client_id, at, via)
            .await
            .map_err(StoreError::while_("recording when a device was seen"))?
        {
            Ok(())
        } else {
            Err(device_not_found(client_id))
        }
    }

    /// Records many sightings `(client ID, at, via)` in one transaction — how a busy MP writes
    /// last-seen times, grouped, instead of one commit per request. Unknown devices (merged
    /// away meanwhile) are skipped.
    pub async fn record_devices_seen(&self, seen: &[(String, i64, String)]) -> Result<()> {
        let failed = || StoreError::while_("recording when devices were seen");
        let mut tx = self.db().begin_write().await.map_err(failed())?;
        for (client_id, at, via) in seen {
            mark_seen(&mut tx, client_id, *at, via)
                .await
                .map_err(failed())?;
        }
        tx.commit().await.map_err(failed())
    }
}
