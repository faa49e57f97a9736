//! Devices, and the grouped-commit writer that registers them (DESIGN §9).
//!
//! A registration wave is bound by the fsync of each commit. [`Store::insert_device`] therefore
//! hands its row to one writer task, which takes the first queued row plus every row already
//! queued behind it (up to [`MAX_BATCH`]), inserts them with one multi-row INSERT in one
//! transaction, commits, and only then answers each caller. While a batch commits the next one
//! queues up, so the batch size adapts to the load with no added latency when idle.

use std::fmt::Write;
use std::slice;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::any::AnyArguments;
use sqlx::query::Query;
use sqlx::{Any, AssertSqlSafe};
use tokio::sync::{mpsc, oneshot};

use crate::error::{is_row_violation, is_unique_violation};
use crate::{Backend, Db, DeviceRecord, Result, Store, StoreError};

/// Most rows per transaction. Measured with 1000 concurrent registrations (cmg-bench `store`),
/// 1024 beat 256 by ~10 % on both backends; and 1024 rows × 13 columns stays under both
/// backends' limit on bound parameters per statement (SQLite 32766, PostgreSQL 65535), so a
/// batch is always one statement.
const MAX_BATCH: usize = 1024;
const DEVICE_COLUMNS: usize = 13;
const _: () = assert!(MAX_BATCH * DEVICE_COLUMNS <= 32766);

/// Rows waiting for the writer; beyond this callers wait to enqueue (back-pressure).
const QUEUE: usize = 4 * MAX_BATCH;

macro_rules! select_devices {
    ($tail:literal) => {
        concat!(
            "SELECT client_id, hardware_id, cert_thumbprint, hostname, os, agent_version, \
             registered_via, bulk_token_id, approved, blocked, registered_at, last_seen_at, \
             last_seen_via FROM devices ",
            $tail
        )
    };
}

struct Pending {
    device: DeviceRecord,
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
                let result = result.map_err(|e| device_error(&Arc::new(e), &pending.device));
                let _ = pending.reply.send(result);
            }
        }
        Err(e) => {
            tracing::warn!(rows = batch.len(), error = %e, "cannot write registered devices");
            let e = Arc::new(e);
            for pending in batch.drain(..) {
                let _ = pending.reply.send(Err(device_error(&e, &pending.device)));
            }
        }
    }
}

fn device_error(e: &Arc<sqlx::Error>, device: &DeviceRecord) -> StoreError {
    if is_unique_violation(e) {
        StoreError::DeviceExists(device.client_id.clone())
    } else {
        StoreError::database("registering devices", Arc::clone(e))
    }
}

/// Inserts `rows` in one transaction with one statement.
async fn insert_devices(db: &Db, rows: &[Pending]) -> Result<(), sqlx::Error> {
    let mut sql = String::from(
        "INSERT INTO devices (client_id, hardware_id, cert_thumbprint, hostname, os, \
         agent_version, registered_via, bulk_token_id, approved, blocked, registered_at, \
         last_seen_at, last_seen_via) VALUES ",
    );
    for row in 0..rows.len() {
        sql.push_str(if row == 0 { "(" } else { ", (" });
        for column in 0..DEVICE_COLUMNS {
            if column > 0 {
                sql.push_str(", ");
            }
            match db.backend {
                // Not `$N`: SQLite finds named parameters by a linear scan, which makes preparing
                // and binding a statement with thousands of them quadratic (measured: ~0.25 s
                // for 500 rows).
                Backend::Sqlite => sql.push('?'),
                Backend::Postgres => {
                    let _ = write!(sql, "${}", row * DEVICE_COLUMNS + column + 1);
                }
            }
        }
        sql.push(')');
    }
    // Not kept as a prepared statement: its text varies with the batch size.
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
    let mut tx = db.begin_write().await?;
    query.execute(&mut *tx).await?;
    tx.commit().await
}

impl Store {
    /// Registers a device. Returns once its row is committed (grouped with concurrent
    /// registrations into one transaction); [`StoreError::DeviceExists`] when the client ID is
    /// taken. If the caller stops waiting, the row may still be written.
    pub async fn insert_device(&self, device: DeviceRecord) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.inner
            .writer
            .queue
            .send(Msg::Insert(Pending { device, reply }))
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
}
