//! Status messages from the clients (DESIGN §5.2 `ccm_system/request`), stored idempotently: a
//! message is identified by its client and its message ID, so a batch the client sends again
//! (its answer was lost) is not stored twice.

use crate::devices::mark_seen;
use crate::{Result, StatusMessageRecord, StatusRow, Store, StoreError};

impl Store {
    /// Stores a batch of status messages from the device `client_id` and records the device as
    /// seen at `received_at` through `via`, in one transaction. Messages already stored (same
    /// client, same message ID) are skipped. Returns how many were stored and how many were
    /// duplicates; [`StoreError::NotFound`], storing nothing, when there is no such device.
    pub async fn store_status_messages(
        &self,
        client_id: &str,
        rows: &[StatusRow],
        received_at: i64,
        via: &str,
    ) -> Result<(u32, u32)> {
        let failed = || StoreError::while_("storing status messages");
        let mut tx = self.db().begin_write().await.map_err(failed())?;
        if !mark_seen(&mut tx, client_id, received_at, via)
            .await
            .map_err(failed())?
        {
            return Err(StoreError::NotFound {
                what: "device",
                id: client_id.to_owned(),
            });
        }
        let (mut accepted, mut duplicates) = (0u32, 0u32);
        for row in rows {
            let stored = sqlx::query(
                "INSERT INTO status_messages \
                 (client_id, message_id, received_at, sent_at, kind, body) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            )
            .bind(client_id)
            .bind(row.message_id.as_str())
            .bind(received_at)
            .bind(row.sent_at)
            .bind(row.kind.as_str())
            .bind(row.body.as_str())
            .execute(&mut *tx)
            .await
            .map_err(failed())?
            .rows_affected();
            if stored > 0 {
                accepted = accepted.saturating_add(1);
            } else {
                duplicates = duplicates.saturating_add(1);
            }
        }
        tx.commit().await.map_err(failed())?;
        Ok((accepted, duplicates))
    }

    /// The status messages stored for `client_id`, in order of arrival.
    pub async fn status_messages(&self, client_id: &str) -> Result<Vec<StatusMessageRecord>> {
        sqlx::query(
            "SELECT message_id, kind, sent_at, body, received_at FROM status_messages \
             WHERE client_id = $1 ORDER BY received_at, id",
        )
        .bind(client_id)
        .fetch_all(&self.db().pool)
        .await
        .map_err(StoreError::while_("reading status messages"))?
        .iter()
        .map(StatusMessageRecord::from_row)
        .collect()
    }
}
