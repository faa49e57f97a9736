//! Keeping a running site current with changes any process makes to the store.
//!
//! Admin commands may run in another process than the site server (DESIGN §8: the tool works
//! whether the site runs or not). Every change bumps the store's change version; the running
//! site reads that one number every interval and reloads what is blocked only when it moved.

use std::sync::Arc;
use std::time::Duration;

use cmg_store::Store;
use cmg_token::Revocations;
use tokio::sync::watch;

/// The latest blocked lists, for every task that verifies tokens.
pub type RevocationWatch = watch::Receiver<Arc<Revocations>>;

/// Loads the blocked lists now and then keeps them current, polling every `interval`, until every
/// receiver is dropped. A store error is logged and retried at the next tick: a site keeps
/// serving with what it last knew rather than stopping.
pub async fn watch_revocations(
    store: Store,
    interval: Duration,
) -> Result<(RevocationWatch, tokio::task::JoinHandle<()>), cmg_store::StoreError> {
    let mut version = store.change_version().await?;
    let (tx, rx) = watch::channel(Arc::new(load(&store).await?));
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if tx.is_closed() {
                return;
            }
            let refreshed = async {
                let now = store.change_version().await?;
                if now == version {
                    return Ok(None);
                }
                Ok::<_, cmg_store::StoreError>(Some((now, load(&store).await?)))
            };
            match refreshed.await {
                Ok(Some((now, revocations))) => {
                    version = now;
                    tracing::info!(
                        version,
                        "site configuration changed; blocked lists reloaded"
                    );
                    tx.send_replace(Arc::new(revocations));
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("cannot check the site database for changes: {e}"),
            }
        }
    });
    Ok((rx, task))
}

async fn load(store: &Store) -> Result<Revocations, cmg_store::StoreError> {
    let bulk_tokens = store
        .blocked_bulk_tokens()
        .await?
        .into_iter()
        .map(|id| id.to_string())
        .collect();
    Ok(Revocations {
        bulk_tokens,
        ..Revocations::default()
    })
}
