//! `cmg site run`: the site server with its management point, kept current with the store.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::mp::{MpOptions, MpServer};
use crate::{DataDir, Site, SiteError, StateWatch, watch_state};

/// How often the running site checks the store for changes made by admin commands.
pub const CHANGE_POLL: Duration = Duration::from_secs(1);

/// Default management point port (ConfigMgr's HTTPS MP listens on 443; 8443 needs no root).
pub const DEFAULT_MP_PORT: u16 = 8443;
/// Default management point address.
pub const DEFAULT_MP_LISTEN: &str = "127.0.0.1:8443";

#[derive(Debug, Clone)]
pub struct SiteRunOptions {
    /// The management point to serve. A role ID of 0 means the site's first MP.
    pub mp: MpOptions,
}

impl SiteRunOptions {
    /// Serves the site's first MP on `mp_listen` with default time-outs.
    pub fn new(mp_listen: SocketAddr) -> Self {
        SiteRunOptions {
            mp: MpOptions::new(mp_listen, 0),
        }
    }
}

/// A running site server. Stop it with [`SiteServer::shutdown`].
pub struct SiteServer {
    site: Arc<Site>,
    state: StateWatch,
    watcher: tokio::task::JoinHandle<()>,
    mp: MpServer,
    mp_role_id: i64,
}

impl SiteServer {
    pub async fn start(data: DataDir, options: SiteRunOptions) -> Result<SiteServer, SiteError> {
        let site = Arc::new(Site::open(data).await?);
        let (state, watcher) = watch_state(Arc::clone(&site), CHANGE_POLL).await?;
        let mut mp_options = options.mp;
        mp_options.role_id = match mp_options.role_id {
            0 => state
                .borrow()
                .management_points
                .first()
                .map(|m| m.role_id)
                .ok_or_else(|| {
                    SiteError::Inconsistent(
                        "the site has no management point; add one with `cmg admin mp add`".into(),
                    )
                })?,
            id => id,
        };
        let role_id = mp_options.role_id;
        let mp = MpServer::start(Arc::clone(&site), state.clone(), mp_options).await;
        let mp = match mp {
            Ok(mp) => mp,
            Err(e) => {
                watcher.abort();
                site.close().await;
                return Err(e);
            }
        };
        Ok(SiteServer {
            site,
            state,
            watcher,
            mp,
            mp_role_id: role_id,
        })
    }

    pub fn mp_addr(&self) -> SocketAddr {
        self.mp.local_addr()
    }

    pub fn mp_role_id(&self) -> i64 {
        self.mp_role_id
    }

    pub fn site(&self) -> &Arc<Site> {
        &self.site
    }

    pub fn state(&self) -> &StateWatch {
        &self.state
    }

    /// This site's MP for the site's own connection point running in the same process (as
    /// `cmg up` does): relayed requests skip the TLS hop to the MP, under the same rules.
    pub fn in_process_mp(&self) -> Result<crate::mp::InProcessMp, SiteError> {
        let (crt, _) = self.site.data().credential(crate::layout::CONNECTION_POINT);
        let pem = std::fs::read_to_string(&crt).map_err(SiteError::io("read", &crt))?;
        let der = cmg_pki::pem_to_der(&pem, "the connection point certificate")?;
        Ok(self.mp.in_process(cmg_pki::thumbprint_sha256(&der)))
    }

    /// Waits until the running site has loaded every change stored so far (it polls every
    /// [`CHANGE_POLL`]); `false` if that took longer than `limit`.
    pub async fn settled(&self, limit: Duration) -> Result<bool, SiteError> {
        let target = self.site.store().change_version().await?;
        let mut state = self.state.clone();
        Ok(matches!(
            tokio::time::timeout(limit, state.wait_for(|s| s.version >= target)).await,
            Ok(Ok(_))
        ))
    }

    /// Stops the MP (requests in flight finish), the watcher, then closes the database after its
    /// queued writes.
    pub async fn shutdown(self) {
        self.mp.shutdown().await;
        self.watcher.abort();
        self.site.close().await;
    }
}
