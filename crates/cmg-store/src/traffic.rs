//! Traffic through each CMG (DESIGN §6): what every connection point counted per endpoint in
//! 5-minute periods. The console's traffic view and the 14-day outbound data alert read it.

use sqlx::Row;

use crate::{Result, Store, StoreError};

/// Requests and bytes one connection point relayed for one endpoint in one period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrafficRow {
    pub cmg: String,
    pub connector: String,
    pub endpoint: String,
    /// Start of the period, Unix seconds.
    pub period_start: i64,
    pub requests: i64,
    /// From devices to the site.
    pub bytes_in: i64,
    /// From the site to devices: the CMG's outbound data.
    pub bytes_out: i64,
}

/// Totals for one endpoint over a time range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointTraffic {
    pub endpoint: String,
    pub requests: i64,
    pub bytes_in: i64,
    pub bytes_out: i64,
}

impl Store {
    /// Adds a connection point's report; a period reported twice adds up (one transaction).
    pub async fn record_traffic(&self, rows: &[TrafficRow]) -> Result<()> {
        let failed = || StoreError::while_("recording CMG traffic");
        let mut tx = self.db().begin_write().await.map_err(failed())?;
        for row in rows {
            sqlx::query(
                "INSERT INTO traffic (cmg, connector, endpoint, period_start, requests, bytes_in, bytes_out) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (cmg, connector, endpoint, period_start) DO UPDATE SET \
                 requests = traffic.requests + excluded.requests, \
                 bytes_in = traffic.bytes_in + excluded.bytes_in, \
                 bytes_out = traffic.bytes_out + excluded.bytes_out",
            )
            .bind(row.cmg.as_str())
            .bind(row.connector.as_str())
            .bind(row.endpoint.as_str())
            .bind(row.period_start)
            .bind(row.requests)
            .bind(row.bytes_in)
            .bind(row.bytes_out)
            .execute(&mut *tx)
            .await
            .map_err(failed())?;
        }
        tx.commit().await.map_err(failed())
    }

    /// Per-endpoint totals of a CMG for the periods starting at or after `since`.
    pub async fn traffic_since(&self, cmg: &str, since: i64) -> Result<Vec<EndpointTraffic>> {
        let failed = || StoreError::while_("reading CMG traffic");
        let rows = sqlx::query(
            "SELECT endpoint, CAST(SUM(requests) AS BIGINT) AS requests, \
             CAST(SUM(bytes_in) AS BIGINT) AS bytes_in, CAST(SUM(bytes_out) AS BIGINT) AS bytes_out \
             FROM traffic WHERE cmg = $1 AND period_start >= $2 GROUP BY endpoint ORDER BY endpoint",
        )
        .bind(cmg)
        .bind(since)
        .fetch_all(&self.db().pool)
        .await
        .map_err(failed())?;
        rows.iter()
            .map(|row| {
                let get = |c: &'static str| {
                    row.try_get::<i64, _>(c).map_err(|e| StoreError::Corrupt {
                        column: c,
                        detail: e.to_string(),
                    })
                };
                Ok(EndpointTraffic {
                    endpoint: row.try_get("endpoint").map_err(|e| StoreError::Corrupt {
                        column: "endpoint",
                        detail: e.to_string(),
                    })?,
                    requests: get("requests")?,
                    bytes_in: get("bytes_in")?,
                    bytes_out: get("bytes_out")?,
                })
            })
            .collect()
    }
}
