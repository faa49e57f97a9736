//! Traffic counters: the per-URI summary in `CMGService.log` (DESIGN §10) and the Prometheus
//! text exposition on `metrics_listen`.
//!
//! Counters are keyed by a bounded label: a mapped endpoint (`/CCM_STS`), `ServiceMetadata`, or
//! `unmapped` for everything the URL map refused, so a scanner cannot grow the table.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Label of requests outside the URL map.
pub(crate) const UNMAPPED: &str = "unmapped";
/// Label of `ServiceMetadata`.
pub(crate) const METADATA: &str = "ServiceMetadata";

/// The counters of one endpoint label.
#[derive(Debug, Default)]
pub(crate) struct EndpointCounters {
    requests: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    micros: AtomicU64,
    statuses: Mutex<BTreeMap<u16, u64>>,
}

impl EndpointCounters {
    pub fn add_bytes_out(&self, n: u64) {
        self.bytes_out.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            requests: self.requests.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            micros: self.micros.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Snapshot {
    requests: u64,
    bytes_in: u64,
    bytes_out: u64,
    micros: u64,
}

/// Every counter of the gateway.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    endpoints: Mutex<BTreeMap<String, Arc<EndpointCounters>>>,
    /// What the last `CMGService.log` summary saw, to report the interval's difference.
    reported: Mutex<BTreeMap<String, Snapshot>>,
    /// Requests not relayed, by origin (`device`, `tunnel`, `gateway`).
    errors: Mutex<BTreeMap<&'static str, u64>>,
    /// Device connections open now (TLS handshake done), HTTP/1.1 and HTTP/2: what the
    /// gateway's memory grows with.
    connections_http1: Arc<AtomicU64>,
    connections_http2: Arc<AtomicU64>,
}

/// A device connection counted as open for as long as this lives.
#[derive(Debug)]
pub(crate) struct OpenConnection(Arc<AtomicU64>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Stats {
    pub fn endpoint(&self, label: &str) -> Arc<EndpointCounters> {
        let mut map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(label) {
            return Arc::clone(c);
        }
        let c = Arc::new(EndpointCounters::default());
        map.insert(label.to_owned(), Arc::clone(&c));
        c
    }

    /// Records one answered request (bytes out are added as the body streams).
    pub fn record(&self, counters: &EndpointCounters, status: u16, bytes_in: u64, took: Duration) {
        counters.requests.fetch_add(1, Ordering::Relaxed);
        counters.bytes_in.fetch_add(bytes_in, Ordering::Relaxed);
        counters.micros.fetch_add(
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        *counters
            .statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(status)
            .or_default() += 1;
    }

    pub fn record_error(&self, origin: &'static str) {
        *self
            .errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(origin)
            .or_default() += 1;
    }

    /// The `CMGService.log` lines for the traffic since the previous call.
    pub fn interval_report(&self, interval: Duration, tunnels: usize) -> Vec<String> {
        let current: Vec<(String, Snapshot)> = self
            .endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.snapshot()))
            .collect();
        let mut reported = self.reported.lock().unwrap_or_else(|p| p.into_inner());
        let mut lines = Vec::new();
        let mut total = 0;
        for (uri, now) in current {
            let before = reported.get(&uri).copied().unwrap_or_default();
            let requests = now.requests.saturating_sub(before.requests);
            let bytes_out = now.bytes_out.saturating_sub(before.bytes_out);
            if requests == 0 && bytes_out == 0 {
                continue;
            }
            total += requests;
            let micros = now.micros.saturating_sub(before.micros);
            let average_ms = if requests == 0 {
                0.0
            } else {
                micros as f64 / requests as f64 / 1000.0
            };
            lines.push(format!(
                "URI {uri}: {requests} requests, {} bytes in, {bytes_out} bytes out, average time {average_ms:.1} ms",
                now.bytes_in.saturating_sub(before.bytes_in),
            ));
            reported.insert(uri, now);
        }
        lines.insert(
            0,
            format!(
                "Traffic in the last {} s: {total} requests; {tunnels} tunnel(s) connected",
                interval.as_secs()
            ),
        );
        lines
    }

    /// Counts a device connection until the returned guard is dropped.
    pub fn connection_opened(&self, http2: bool) -> OpenConnection {
        let counter = if http2 {
            &self.connections_http2
        } else {
            &self.connections_http1
        };
        counter.fetch_add(1, Ordering::Relaxed);
        OpenConnection(Arc::clone(counter))
    }

    /// Prometheus text exposition (format 0.0.4).
    pub fn prometheus(&self, tunnels: usize, settings_version: Option<i64>) -> String {
        let endpoints: Vec<(String, Arc<EndpointCounters>)> = self
            .endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP cmg_gateway_requests_total Device requests answered, by endpoint and HTTP status."
        );
        let _ = writeln!(out, "# TYPE cmg_gateway_requests_total counter");
        for (label, c) in &endpoints {
            let statuses = c.statuses.lock().unwrap_or_else(|p| p.into_inner()).clone();
            for (status, n) in statuses {
                let _ = writeln!(
                    out,
                    "cmg_gateway_requests_total{{endpoint=\"{}\",status=\"{status}\"}} {n}",
                    escape(label)
                );
            }
        }
        for (name, help, pick) in [
            (
                "cmg_gateway_request_bytes_total",
                "Request body bytes received from devices, by endpoint.",
                (|s: &Snapshot| s.bytes_in) as fn(&Snapshot) -> u64,
            ),
            (
                "cmg_gateway_response_bytes_total",
                "Response body bytes sent to devices, by endpoint.",
                |s: &Snapshot| s.bytes_out,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            for (label, c) in &endpoints {
                let _ = writeln!(
                    out,
                    "{name}{{endpoint=\"{}\"}} {}",
                    escape(label),
                    pick(&c.snapshot())
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP cmg_gateway_request_seconds_total Time to answer device requests (to the response head), by endpoint."
        );
        let _ = writeln!(out, "# TYPE cmg_gateway_request_seconds_total counter");
        for (label, c) in &endpoints {
            let _ = writeln!(
                out,
                "cmg_gateway_request_seconds_total{{endpoint=\"{}\"}} {}",
                escape(label),
                c.snapshot().micros as f64 / 1e6
            );
        }
        let _ = writeln!(
            out,
            "# HELP cmg_gateway_relay_errors_total Device requests not relayed, by origin (device, tunnel, gateway)."
        );
        let _ = writeln!(out, "# TYPE cmg_gateway_relay_errors_total counter");
        for (origin, n) in self.errors.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(
                out,
                "cmg_gateway_relay_errors_total{{origin=\"{origin}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP cmg_gateway_tunnels Live tunnels from connection points."
        );
        let _ = writeln!(out, "# TYPE cmg_gateway_tunnels gauge");
        let _ = writeln!(out, "cmg_gateway_tunnels {tunnels}");
        let _ = writeln!(
            out,
            "# HELP cmg_gateway_device_connections Device connections open (TLS handshake done), by protocol."
        );
        let _ = writeln!(out, "# TYPE cmg_gateway_device_connections gauge");
        for (protocol, counter) in [
            ("http/1.1", &self.connections_http1),
            ("h2", &self.connections_http2),
        ] {
            let _ = writeln!(
                out,
                "cmg_gateway_device_connections{{protocol=\"{protocol}\"}} {}",
                counter.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP cmg_gateway_settings_version Version of the CMG settings in force (-1: none yet)."
        );
        let _ = writeln!(out, "# TYPE cmg_gateway_settings_version gauge");
        let _ = writeln!(
            out,
            "cmg_gateway_settings_version {}",
            settings_version.unwrap_or(-1)
        );
        out
    }
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_report_shows_only_new_traffic() {
        let stats = Stats::default();
        let sts = stats.endpoint("/CCM_STS");
        stats.record(&sts, 200, 100, Duration::from_millis(10));
        stats.record(&sts, 200, 100, Duration::from_millis(30));
        sts.add_bytes_out(500);
        let lines = stats.interval_report(Duration::from_secs(60), 1);
        assert!(lines[0].contains("2 requests"), "{lines:?}");
        assert!(
            lines[1].contains(
                "URI /CCM_STS: 2 requests, 200 bytes in, 500 bytes out, average time 20.0 ms"
            ),
            "{lines:?}"
        );
        let again = stats.interval_report(Duration::from_secs(60), 1);
        assert_eq!(again.len(), 1, "{again:?}");
        assert!(again[0].contains("0 requests"));
    }

    #[test]
    fn prometheus_text_has_endpoint_status_tunnels_and_version() {
        let stats = Stats::default();
        let reg = stats.endpoint("/MP_ClientRegistration");
        stats.record(&reg, 401, 0, Duration::from_millis(1));
        stats.record_error("device");
        let text = stats.prometheus(2, Some(7));
        assert!(text.contains(
            "cmg_gateway_requests_total{endpoint=\"/MP_ClientRegistration\",status=\"401\"} 1"
        ));
        assert!(text.contains("cmg_gateway_tunnels 2"));
        assert!(text.contains("cmg_gateway_settings_version 7"));
        assert!(text.contains("cmg_gateway_relay_errors_total{origin=\"device\"} 1"));
        assert_eq!(escape("a\"b\\"), "a\\\"b\\\\");
    }

    #[test]
    fn open_device_connections_are_counted_until_they_end() {
        let stats = Stats::default();
        let first = stats.connection_opened(false);
        let _second = stats.connection_opened(false);
        let _third = stats.connection_opened(true);
        drop(first);
        let text = stats.prometheus(0, None);
        assert!(
            text.contains("cmg_gateway_device_connections{protocol=\"http/1.1\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("cmg_gateway_device_connections{protocol=\"h2\"} 1"),
            "{text}"
        );
    }
}
