//! What a running site knows, kept current with changes any process makes to the store.
//!
//! Admin commands may run in another process than the site server (DESIGN §8: the tool works
//! whether the site runs or not). Every change bumps the store's change version; the running site
//! reads that one number every interval and reloads its [`SiteState`] only when it moved (or when
//! a published key may have retired, every [`FULL_RELOAD`]). Request handlers read the current
//! snapshot without touching the database.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use cmg_store::{CertPurpose, CertStatus, CmgRecord, MpRecord};
use cmg_token::{Revocations, TokenVerifier};
use tokio::sync::watch;

use crate::{Site, SiteError, SiteSettings, unix_now};

/// Reload even without a change, so retiring keys stop verifying on time.
const FULL_RELOAD: Duration = Duration::from_secs(600);

/// One consistent view of the site's configuration.
#[derive(Debug)]
pub struct SiteState {
    /// The store's change version this view was loaded at.
    pub version: i64,
    pub revocations: Revocations,
    pub verifier: TokenVerifier,
    pub settings: SiteSettings,
    pub management_points: Vec<MpRecord>,
    pub cmgs: Vec<CmgRecord>,
    /// SHA-256 thumbprints of the active, unexpired connection point certificates (the site
    /// server's own and those of `cmg admin connector add`): only connections presenting one of
    /// these may pass on a device identity verified by a gateway (DESIGN §6). A connection point
    /// removed with `cmg admin connector remove` has its certificate retired, and drops out.
    pub connection_points: HashSet<String>,
}

/// The latest [`SiteState`], for every task that serves devices.
pub type StateWatch = watch::Receiver<Arc<SiteState>>;

impl SiteState {
    pub async fn load(site: &Site) -> Result<SiteState, SiteError> {
        let store = site.store();
        let version = store.change_version().await?;
        let bulk_tokens = store
            .blocked_bulk_tokens()
            .await?
            .into_iter()
            .map(|id| id.to_string())
            .collect();
        let devices = store.blocked_devices().await?.into_iter().collect();
        let now = unix_now();
        let connection_points = store
            .certificates()
            .await?
            .into_iter()
            .filter(|c| {
                c.purpose == CertPurpose::ConnectionPoint
                    && c.status == CertStatus::Active
                    && c.not_after > now
            })
            .map(|c| c.thumbprint_sha256)
            .collect();
        Ok(SiteState {
            version,
            revocations: Revocations {
                bulk_tokens,
                devices,
                ..Revocations::default()
            },
            verifier: site.verifier(now).await?,
            settings: SiteSettings::from_pairs(store.settings().await?)?,
            management_points: store.management_points().await?,
            cmgs: store.cmgs().await?,
            connection_points,
        })
    }
}

/// Loads the state now and keeps it current, polling every `interval`, until every receiver is
/// dropped. A failed reload is logged and retried at the next tick: the site keeps serving with
/// what it last knew rather than stopping.
pub async fn watch_state(
    site: Arc<Site>,
    interval: Duration,
) -> Result<(StateWatch, tokio::task::JoinHandle<()>), SiteError> {
    let initial = Arc::new(SiteState::load(&site).await?);
    let (tx, rx) = watch::channel(initial);
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_full = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            if tx.is_closed() {
                return;
            }
            let known = tx.borrow().version;
            let due = last_full.elapsed() >= FULL_RELOAD;
            let refreshed = async {
                if !due && site.store().change_version().await? == known {
                    return Ok(None);
                }
                Ok::<_, SiteError>(Some(SiteState::load(&site).await?))
            };
            match refreshed.await {
                Ok(Some(state)) => {
                    last_full = tokio::time::Instant::now();
                    if state.version != known {
                        tracing::info!(
                            version = state.version,
                            "site configuration changed; reloaded"
                        );
                    }
                    tx.send_replace(Arc::new(state));
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("cannot reload the site configuration: {e}"),
            }
        }
    });
    Ok((rx, task))
}
