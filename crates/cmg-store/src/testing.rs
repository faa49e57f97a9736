//! Fresh site databases for tests (feature `testing`), so that every store test runs on both
//! backends (DESIGN §9): always SQLite in a temporary directory, plus PostgreSQL when the
//! environment variable [`POSTGRES_ENV`] holds a server URL, e.g.
//! `postgres://postgres@127.0.0.1:5432/test`. Each PostgreSQL test store gets a database of its
//! own (`cmg_t_<random>`), created through that URL and dropped when the [`TestStore`] drops.
//!
//! Setup failures panic: these are test fixtures.

use std::str::FromStr;

use sqlx::any::AnyConnectOptions;
use sqlx::{AnyConnection, AssertSqlSafe, Connection};
use tempfile::TempDir;
use uuid::Uuid;

use crate::Store;

/// The variable naming the PostgreSQL server the tests may create databases on.
pub const POSTGRES_ENV: &str = "CMG_TEST_POSTGRES";

/// A store on a fresh database, which lives as long as this value.
pub struct TestStore {
    /// `sqlite` or `postgres`, to tell test failures apart.
    pub label: &'static str,
    pub store: Store,
    db: TestDb,
}

enum TestDb {
    Sqlite {
        url: String,
        _dir: TempDir,
    },
    Postgres {
        url: String,
        server_url: String,
        name: String,
    },
}

impl TestStore {
    /// The database URL, e.g. to hand to another component under test.
    pub fn url(&self) -> &str {
        match &self.db {
            TestDb::Sqlite { url, .. } | TestDb::Postgres { url, .. } => url,
        }
    }

    /// Opens a second, independent store on the same database, as another process would.
    pub async fn open_again(&self) -> Store {
        open(self.label, self.url()).await
    }
}

async fn open(label: &str, url: &str) -> Store {
    match Store::open(url).await {
        Ok(store) => store,
        Err(e) => panic!("cannot open the {label} test store: {e}"),
    }
}

/// A fresh SQLite store, plus a fresh PostgreSQL one when [`POSTGRES_ENV`] is set.
pub async fn test_stores() -> Vec<TestStore> {
    let mut stores = vec![sqlite_store().await];
    if let Some(server_url) = std::env::var(POSTGRES_ENV).ok().filter(|v| !v.is_empty()) {
        stores.push(postgres_store(&server_url).await);
    }
    stores
}

/// A fresh SQLite store in a temporary directory.
pub async fn sqlite_store() -> TestStore {
    let dir = match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(e) => panic!("cannot create a temporary directory: {e}"),
    };
    let url = format!("sqlite://{}", dir.path().join("site.db").display());
    TestStore {
        label: "sqlite",
        store: open("sqlite", &url).await,
        db: TestDb::Sqlite { url, _dir: dir },
    }
}

/// A fresh PostgreSQL store in a new database on the server at `server_url`.
pub async fn postgres_store(server_url: &str) -> TestStore {
    sqlx::any::install_default_drivers();
    let name = format!("cmg_t_{}", Uuid::new_v4().simple());
    let mut url = match AnyConnectOptions::from_str(server_url) {
        Ok(options) => options.database_url,
        Err(e) => panic!("{POSTGRES_ENV} is not a URL: {e}"),
    };
    url.set_path(&format!("/{name}"));
    on_server(server_url, format!("CREATE DATABASE {name}")).await;
    let url = url.to_string();
    TestStore {
        label: "postgres",
        store: open("postgres", &url).await,
        db: TestDb::Postgres {
            url,
            server_url: server_url.to_owned(),
            name,
        },
    }
}

async fn on_server(server_url: &str, sql: String) {
    let result = async {
        let mut conn = AnyConnection::connect(server_url).await?;
        sqlx::raw_sql(AssertSqlSafe(sql.as_str()))
            .execute(&mut conn)
            .await?;
        conn.close().await
    }
    .await;
    if let Err(e) = result {
        panic!("`{sql}` failed on the {POSTGRES_ENV} server: {e}");
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let TestDb::Postgres {
            server_url, name, ..
        } = self
        else {
            return;
        };
        let (server_url, sql) = (
            server_url.clone(),
            format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        );
        // Drop runs inside the test's runtime, which cannot be blocked on: use a runtime of
        // our own on a thread of our own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut conn = AnyConnection::connect(&server_url).await?;
                sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut conn).await?;
                conn.close().await
            })?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("cmg-store testing: could not drop test database {name}; drop it by hand");
        }
    }
}
