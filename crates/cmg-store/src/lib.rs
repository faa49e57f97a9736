//! The site database of cmg (DESIGN §9): its schema, its migrations and every SQL statement, behind
//! one [`Store`] type with two backends — SQLite (the embedded default, in WAL mode) and
//! PostgreSQL (for scale and high availability).
//!
//! The store knows nothing of tokens, keys, HTTP or the command line: it keeps records. What it
//! promises:
//!
//! - **Durability.** A call returns only after its transaction committed (SQLite runs with
//!   `synchronous=FULL`).
//! - **Grouped commits for registrations.** [`Store::insert_device`] queues the row to one writer
//!   task that commits everything already queued in a single transaction, so a registration wave
//!   costs one fsync per batch rather than per device — and each caller still returns only once
//!   its own row is durable. [`Store::insert_conflicting_device`] rides the same batches, its
//!   conflict row in the same transaction as its device row.
//! - **Audited admin changes.** Every admin change writes an [`AuditEntry`] and bumps the
//!   [change version](Store::change_version) in the same transaction as the change, so another
//!   process sharing the database (the CLI beside a running site) is noticed by polling one row.
//! - **Idempotent status delivery.** A status message is stored once per client and message ID,
//!   however often a client sends its batch again.
//! - **No secrets.** No column holds a private key or a token; errors never show a database
//!   password.

mod admin;
mod config;
mod devices;
mod error;
mod migrate;
mod records;
mod status;
#[cfg(feature = "testing")]
pub mod testing;
mod traffic;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::any::AnyPoolOptions;
use sqlx::{Any, AnyConnection, AnyPool, Connection, Transaction};

pub use error::{Result, StoreError};
pub use records::{
    AuditEntry, BulkTokenRecord, CertPurpose, CertStatus, CertificateRecord, CmgRecord,
    ConnectionPointRecord, DeviceConflict, DeviceRecord, MpRecord, SiteRecord, StatusMessageRecord,
    StatusRow,
};
pub use traffic::{EndpointTraffic, TrafficRow};

/// Which database a [`Store`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    fn pool_size(self) -> u32 {
        match self {
            // Writes serialise on SQLite's single write lock; a few connections serve the reads.
            Backend::Sqlite => 4,
            Backend::Postgres => 10,
        }
    }
}

/// The site database. Cheap to clone; clones share one connection pool and one device writer.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    writer: devices::Writer,
}

/// The pool and what differs between backends; shared with the device writer task.
#[derive(Clone)]
pub(crate) struct Db {
    pool: AnyPool,
    backend: Backend,
}

impl Db {
    /// Starts a transaction that will write. On SQLite it takes the write lock up front
    /// (`BEGIN IMMEDIATE`, waiting up to the busy timeout): a deferred transaction that reads
    /// first fails without waiting when another process wrote in between.
    async fn begin_write(&self) -> Result<Transaction<'static, Any>, sqlx::Error> {
        match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => self.pool.begin().await,
        }
    }
}

/// The current time as Unix seconds, the unit of every timestamp in the database.
pub(crate) fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl Store {
    /// Opens the site database at `url` and brings its schema up to date.
    ///
    /// `sqlite://PATH` opens (creating if missing) an embedded database file; several processes
    /// may open the same file. `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE` connects to
    /// PostgreSQL. Must be called inside a Tokio runtime: it starts the device writer task.
    pub async fn open(url: &str) -> Result<Store> {
        sqlx::any::install_default_drivers();

        let shown = error::redact_url(url);
        let (backend, url) = if let Some(path) = url.strip_prefix("sqlite:") {
            // Create the file on first use, unless the caller chose a mode in the URL.
            let url = if path.contains('?') {
                url.to_owned()
            } else {
                format!("{url}?mode=rwc")
            };
            (Backend::Sqlite, url)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (Backend::Postgres, url.to_owned())
        } else {
            return Err(StoreError::UnsupportedUrl { url: shown });
        };

        let failed = |source| StoreError::Open {
            url: shown.clone(),
            source,
        };
        // Fail at once on a wrong URL or an unreachable server: the pool below would retry
        // until its acquire timeout.
        AnyConnection::connect(&url)
            .await
            .map_err(failed)?
            .close()
            .await
            .map_err(failed)?;

        let mut options = AnyPoolOptions::new()
            .max_connections(backend.pool_size())
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(30));
        if backend == Backend::Sqlite {
            options = options.after_connect(|conn, _| Box::pin(sqlite_session(conn)));
        }
        let pool = options.connect(&url).await.map_err(failed)?;
        let db = Db { pool, backend };
        let version = migrate::run(&db).await?;
        tracing::info!(db = %shown, ?backend, schema_version = version, "site database opened");
        Ok(Store {
            inner: Arc::new(Inner {
                writer: devices::Writer::start(db.clone()),
                db,
            }),
        })
    }

    pub fn backend(&self) -> Backend {
        self.inner.db.backend
    }

    /// Finishes the queued device inserts (their callers get their answers), then closes every
    /// connection. Afterwards every operation, on this handle and its clones, fails with
    /// [`StoreError::Closed`].
    pub async fn close(&self) {
        self.inner.writer.close().await;
        self.inner.db.pool.close().await;
    }

    fn db(&self) -> &Db {
        &self.inner.db
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend())
            .finish_non_exhaustive()
    }
}

/// Per-connection SQLite settings: durability (`synchronous=FULL`), concurrency with other
/// processes (WAL, busy timeout) and enforced foreign keys.
async fn sqlite_session(conn: &mut AnyConnection) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(
        "PRAGMA busy_timeout = 5000; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON",
    )
    .execute(&mut *conn)
    .await?;
    // WAL is a property of the file. Switching needs an exclusive lock that the busy timeout does
    // not wait for, so switch only when it is not WAL yet (the first open of a new file).
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut *conn)
        .await?;
    if !mode.eq_ignore_ascii_case("wal") {
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode = WAL")
            .fetch_one(&mut *conn)
            .await?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(sqlx::Error::Configuration(
                format!("SQLite refused WAL mode (journal mode is `{mode}`)").into(),
            ));
        }
    }
    Ok(())
}
