//! The CRLs PKI client certificates are checked against (DESIGN §4, §11): read from the files in
//! `crl_files`, and fetched over plain HTTP from the CRL distribution points of the trusted CAs
//! and of client certificates that chain to them (never from an untrusted certificate, so a
//! device cannot make the gateway fetch arbitrary URLs).
//!
//! rustls never downloads CRLs: this module does, refreshes them every `crl_refresh_secs` and
//! when a CRL's nextUpdate passes, and swaps the whole set atomically, bumping a generation
//! number that invalidates every connection's cached verdict.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use cmg_pki::crl::CrlInfo;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::{Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::sync::{Notify, watch};
use webpki::{CertRevocationList, OwnedCertRevocationList};

use crate::{Shared, unix_now};

/// How long one CRL download may take.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest CRL downloaded.
pub const MAX_CRL_BYTES: usize = 10 * 1024 * 1024;
/// A distribution point that failed is tried again for a new connection after this long (the
/// periodic refresh tries it anyway).
const RETRY_FAILED: Duration = Duration::from_secs(60);

/// One CRL in force.
#[derive(Debug)]
pub(crate) struct LoadedCrl {
    pub crl: Arc<CertRevocationList<'static>>,
    pub info: CrlInfo,
}

/// Every CRL in force, by source (a file path or a URL).
#[derive(Debug, Default)]
pub(crate) struct CrlSet {
    pub generation: u64,
    by_source: BTreeMap<String, Arc<Vec<LoadedCrl>>>,
}

impl CrlSet {
    /// The CRLs that are still current at `now` (a CRL past its nextUpdate counts as absent).
    pub fn usable(&self, now: i64) -> Vec<Arc<CertRevocationList<'static>>> {
        self.by_source
            .values()
            .flat_map(|crls| crls.iter())
            .filter(|c| c.info.next_update.is_none_or(|n| n > now))
            .map(|c| Arc::clone(&c.crl))
            .collect()
    }

    fn has(&self, source: &str) -> bool {
        self.by_source.get(source).is_some_and(|c| !c.is_empty())
    }

    fn next_updates(&self) -> impl Iterator<Item = i64> + '_ {
        self.by_source
            .values()
            .flat_map(|crls| crls.iter())
            .filter_map(|c| c.info.next_update)
    }
}

/// The gateway's CRLs and the distribution points it knows.
#[derive(Debug, Default)]
pub(crate) struct CrlStore {
    current: RwLock<Arc<CrlSet>>,
    /// Distribution points learnt, with the time of the last download attempt.
    urls: tokio::sync::Mutex<HashMap<String, Instant>>,
    /// Woken when new settings may name new distribution points.
    pub wake: Notify,
}

impl CrlStore {
    pub fn snapshot(&self) -> Arc<CrlSet> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn generation(&self) -> u64 {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .generation
    }

    /// Replaces the CRLs of the given sources and swaps the set in, with a new generation.
    fn apply(&self, updates: Vec<(String, Vec<LoadedCrl>)>) -> u64 {
        let mut slot = self.current.write().unwrap_or_else(|p| p.into_inner());
        let mut by_source = slot.by_source.clone();
        for (source, crls) in updates {
            by_source.insert(source, Arc::new(crls));
        }
        let generation = slot.generation + 1;
        *slot = Arc::new(CrlSet {
            generation,
            by_source,
        });
        generation
    }
}

/// Parses the CRLs of one source (PEM or DER).
pub(crate) fn parse(source: &str, bytes: &[u8]) -> Result<Vec<LoadedCrl>, String> {
    let ders = cmg_pki::crl::crls_from_pem_or_der(bytes, source).map_err(|e| e.to_string())?;
    ders.iter()
        .map(|der| {
            let info = CrlInfo::from_der(der).map_err(|e| e.to_string())?;
            let crl = OwnedCertRevocationList::from_der(der)
                .map_err(|e| format!("{source} is not a CRL rustls-webpki accepts: {e}"))?;
            Ok(LoadedCrl {
                crl: Arc::new(CertRevocationList::from(crl)),
                info,
            })
        })
        .collect()
}

fn read_file(path: &Path) -> Result<Vec<LoadedCrl>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse(&path.display().to_string(), &bytes)
}

fn describe(crls: &[LoadedCrl]) -> String {
    crls.iter()
        .map(|c| {
            format!(
                "{} ({} revoked certificate(s), next update {})",
                c.info.issuer,
                c.info.entries,
                c.info
                    .next_update
                    .map_or_else(|| "none".to_owned(), format_time)
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn format_time(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Reads the configured CRL files at start-up: an unreadable or invalid file stops the start.
pub(crate) fn load_files(shared: &Shared) -> Result<(), String> {
    let mut updates = Vec::new();
    for path in &shared.config.crl_files {
        let crls = read_file(path)?;
        shared.handler_log.info(&format!(
            "CRL file {} loaded: {}",
            path.display(),
            describe(&crls)
        ));
        warn_stale(shared, &path.display().to_string(), &crls);
        updates.push((path.display().to_string(), crls));
    }
    if !updates.is_empty() {
        shared.crls.apply(updates);
    }
    Ok(())
}

fn warn_stale(shared: &Shared, source: &str, crls: &[LoadedCrl]) {
    let now = unix_now();
    for c in crls {
        if c.info.next_update.is_some_and(|n| n <= now) {
            shared.handler_log.warn(&format!(
                "The CRL of {} from {source} is past its next update; certificates it covers \
                 count as of unknown revocation status until a newer one is loaded",
                c.info.issuer
            ));
        }
    }
}

/// Downloads one CRL over plain HTTP (HTTP/1.1, no redirects), within [`FETCH_TIMEOUT`] and
/// [`MAX_CRL_BYTES`].
pub(crate) async fn fetch(url: &str) -> Result<Vec<u8>, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err("only http:// CRL distribution points are fetched".into());
    }
    let authority = uri
        .authority()
        .ok_or_else(|| "the URL has no host".to_owned())?
        .clone();
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = authority.port_u16().unwrap_or(80);
    let path = uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    let mut driver = None;
    let result = tokio::time::timeout(FETCH_TIMEOUT, async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("HTTP handshake failed: {e}"))?;
        driver = Some(tokio::spawn(conn));
        let request = Request::get(path)
            .header(header::HOST, authority.as_str())
            .header(header::USER_AGENT, "cmg-gateway")
            .header(header::ACCEPT, "application/pkix-crl, */*")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        if response.status() != StatusCode::OK {
            return Err(format!("the server answered {}", response.status()));
        }
        let declared = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_CRL_BYTES as u64) {
            return Err(format!("the CRL is larger than {MAX_CRL_BYTES} bytes"));
        }
        Limited::new(response.into_body(), MAX_CRL_BYTES)
            .collect()
            .await
            .map(|b| b.to_bytes().to_vec())
            .map_err(|e| format!("reading the CRL failed (limit {MAX_CRL_BYTES} bytes): {e}"))
    })
    .await
    .unwrap_or_else(|_| Err(format!("no answer in {} s", FETCH_TIMEOUT.as_secs())));
    if let Some(driver) = driver {
        driver.abort();
    }
    result
}

async fn fetch_parse(shared: &Shared, url: &str) -> Option<Vec<LoadedCrl>> {
    match fetch(url).await.and_then(|bytes| parse(url, &bytes)) {
        Ok(crls) => {
            shared
                .handler_log
                .info(&format!("CRL fetched from {url}: {}", describe(&crls)));
            warn_stale(shared, url, &crls);
            Some(crls)
        }
        Err(e) => {
            shared.handler_log.error(&format!(
                "Cannot fetch the CRL from {url}: {e}; keeping the CRL from there in force \
                 (if any) until its next update"
            ));
            None
        }
    }
}

/// Makes sure the CRLs of these distribution points are known: new ones (and ones that failed
/// more than a minute ago) are downloaded now. Concurrent callers wait for each other, so a
/// burst of devices from a new CA downloads its CRL once. Only `http://` URLs are used.
pub(crate) async fn learn(shared: &Shared, urls: &[String]) {
    let wanted: Vec<&String> = urls
        .iter()
        .filter(|u| {
            u.get(..7)
                .is_some_and(|s| s.eq_ignore_ascii_case("http://"))
        })
        .collect();
    if wanted.is_empty() {
        return;
    }
    let mut known = shared.crls.urls.lock().await;
    let set = shared.crls.snapshot();
    let mut updates = Vec::new();
    for url in wanted {
        let due = match known.get(url.as_str()) {
            None => true,
            Some(last) => !set.has(url) && last.elapsed() >= RETRY_FAILED,
        };
        if !due {
            continue;
        }
        known.insert(url.clone(), Instant::now());
        if let Some(crls) = fetch_parse(shared, url).await {
            updates.push((url.clone(), crls));
        }
    }
    if !updates.is_empty() {
        shared.crls.apply(updates);
    }
}

/// Re-reads every file and downloads every known distribution point again; a source that fails
/// keeps its previous CRLs.
async fn refresh_all(shared: &Shared) {
    let mut updates = Vec::new();
    for path in &shared.config.crl_files {
        match read_file(path) {
            Ok(crls) => {
                shared.handler_log.info(&format!(
                    "CRL file {} refreshed: {}",
                    path.display(),
                    describe(&crls)
                ));
                warn_stale(shared, &path.display().to_string(), &crls);
                updates.push((path.display().to_string(), crls));
            }
            Err(e) => shared.handler_log.error(&format!(
                "Cannot refresh a CRL file: {e}; keeping the one loaded before"
            )),
        }
    }
    let urls: Vec<String> = {
        let mut known = shared.crls.urls.lock().await;
        let now = Instant::now();
        known.values_mut().for_each(|t| *t = now);
        known.keys().cloned().collect()
    };
    for url in urls {
        if let Some(crls) = fetch_parse(shared, &url).await {
            updates.push((url, crls));
        }
    }
    if !updates.is_empty() {
        shared.crls.apply(updates);
    }
}

/// How long until the next refresh: the configured period, or sooner when a CRL's nextUpdate
/// comes first (a CRL already past it is retried every minute).
fn next_refresh(shared: &Shared) -> Duration {
    let now = unix_now();
    let period = shared.config.crl_refresh_secs;
    let wait = shared
        .crls
        .snapshot()
        .next_updates()
        .map(|n| {
            if n > now {
                u64::try_from(n - now).unwrap_or(u64::MAX).saturating_add(1)
            } else {
                RETRY_FAILED.as_secs()
            }
        })
        .fold(period, u64::min);
    Duration::from_secs(wait.max(1))
}

/// The refresh loop: periodic and nextUpdate-driven refreshes, and the trusted CAs'
/// distribution points whenever new settings arrive.
pub(crate) async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        let wait = next_refresh(&shared);
        tokio::select! {
            _ = tokio::time::sleep(wait) => refresh_all(&shared).await,
            _ = shared.crls.wake.notified() => {
                let urls = shared
                    .active()
                    .filter(|a| a.settings.crl_check)
                    .and_then(|a| a.trust.as_ref().map(|t| t.cdp_urls.clone()))
                    .unwrap_or_default();
                learn(&shared, &urls).await;
            }
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::format_time;

    #[test]
    fn times_are_shown_in_utc() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_time(1_800_000_000), "2027-01-15 08:00:00 UTC");
        assert_eq!(format_time(951_782_400), "2000-02-29 00:00:00 UTC");
    }
}
