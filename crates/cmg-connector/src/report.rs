//! Traffic reports to the site every 5 minutes (DESIGN §6), and the 14-day outbound data alert
//! they feed (DESIGN §2): logged when its level changes, and — with "stop at critical" on — the
//! relay stops at the critical level.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use cmg_site::cmg::{ALERT_WINDOW_SECS, AlertLevel, alert_level};
use cmg_site::unix_now;
use cmg_store::TrafficRow;
use tokio::sync::watch;

use crate::relay::Relay;

/// Traffic is counted in periods of this length.
const PERIOD_SECS: i64 = 300;

pub(crate) async fn every(
    relay: Arc<Relay>,
    name: String,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut level = AlertLevel::Normal;
    loop {
        let stopping = tokio::select! {
            _ = tokio::time::sleep(interval) => false,
            _ = stop.changed() => true,
        };
        flush(&relay, &name).await;
        if stopping {
            return;
        }
        level = check_alert(&relay, level).await;
    }
}

/// Writes what was counted since the last report; on failure keeps it for the next one.
async fn flush(relay: &Relay, name: &str) {
    let taken = std::mem::take(&mut *relay.traffic.lock().unwrap_or_else(|p| p.into_inner()));
    if taken.is_empty() {
        return;
    }
    let now = unix_now();
    let rows: Vec<TrafficRow> = taken
        .iter()
        .map(|(endpoint, counts)| TrafficRow {
            cmg: relay.cmg().to_owned(),
            connector: name.to_owned(),
            endpoint: endpoint.clone(),
            period_start: now - now.rem_euclid(PERIOD_SECS),
            requests: counts.requests,
            bytes_in: counts.bytes_in,
            bytes_out: counts.bytes_out,
        })
        .collect();
    if let Err(e) = relay.site().store().record_traffic(&rows).await {
        relay.log().warn(&format!(
            "Cannot report traffic to the site: {e}; it is kept for the next report"
        ));
        let mut traffic = relay.traffic.lock().unwrap_or_else(|p| p.into_inner());
        for (endpoint, counts) in taken {
            let entry = traffic.entry(endpoint).or_default();
            entry.requests += counts.requests;
            entry.bytes_in += counts.bytes_in;
            entry.bytes_out += counts.bytes_out;
        }
    }
}

async fn check_alert(relay: &Relay, previous: AlertLevel) -> AlertLevel {
    let state = relay.state().borrow().clone();
    let Some(definition) = relay.definition(&state) else {
        return previous;
    };
    let since = unix_now() - ALERT_WINDOW_SECS;
    let bytes_out = match relay.site().store().traffic_since(relay.cmg(), since).await {
        Ok(totals) => totals.iter().map(|t| t.bytes_out).sum(),
        Err(e) => {
            relay.log().warn(&format!(
                "Cannot read the CMG's traffic for the data alert: {e}"
            ));
            return previous;
        }
    };
    let level = alert_level(bytes_out, definition.data_alert_gb);
    if level != previous {
        let message = format!(
            "Outbound data of CMG {} over 14 days: {bytes_out} bytes of a {} GB threshold; alert level {}",
            definition.name,
            definition.data_alert_gb,
            level.as_str()
        );
        match level {
            AlertLevel::Normal => relay.log().info(&message),
            AlertLevel::Warning => relay.log().warn(&message),
            AlertLevel::Critical => relay.log().error(&message),
        }
    }
    let stop = definition.stop_at_critical && level == AlertLevel::Critical;
    if relay.stopped.swap(stop, Ordering::Relaxed) != stop {
        relay.log().error(&format!(
            "CMG {} {} relaying: stop at critical is {}",
            definition.name,
            if stop { "stopped" } else { "resumed" },
            if definition.stop_at_critical {
                "on"
            } else {
                "off"
            }
        ));
    }
    level
}
