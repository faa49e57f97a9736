//! The schema, as an ordered list of migrations, and the runner that applies the missing ones.
//!
//! Each migration is one SQL text shared by both backends, with three placeholders for the types
//! whose spelling differs; rendering them per backend keeps the two schemas from drifting apart.
//! A shipped migration is never edited: changes are new versions appended to [`MIGRATIONS`].

use sqlx::{AssertSqlSafe, Row};

use crate::{Backend, Db, Result, StoreError, now};

const MIGRATIONS: &[(i64, &str)] = &[(1, V1), (2, V2)];

/// Schema version 1: everything the site needs from its first release.
const V1: &str = r#"
CREATE TABLE site (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    site_code TEXT NOT NULL,
    hierarchy_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    token_key_alg TEXT NOT NULL
);

CREATE TABLE certificates (
    thumbprint_sha256 TEXT PRIMARY KEY,
    thumbprint_sha1 TEXT NOT NULL,
    purpose TEXT NOT NULL,
    subject TEXT NOT NULL,
    not_before BIGINT NOT NULL,
    not_after BIGINT NOT NULL,
    status TEXT NOT NULL,
    key_alg TEXT NOT NULL,
    cert_der {blob} NOT NULL,
    created_at BIGINT NOT NULL,
    retire_after BIGINT
);

CREATE TABLE bulk_tokens (
    id TEXT PRIMARY KEY,
    valid_from BIGINT NOT NULL,
    valid_until BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    blocked {bool} NOT NULL
);
CREATE INDEX bulk_tokens_created_at ON bulk_tokens (created_at);

-- bulk_token_id has no foreign key: a device's record outlives the purge of expired tokens.
CREATE TABLE devices (
    client_id TEXT PRIMARY KEY,
    hardware_id TEXT NOT NULL,
    cert_thumbprint TEXT NOT NULL,
    hostname TEXT NOT NULL,
    os TEXT NOT NULL,
    agent_version TEXT NOT NULL,
    registered_via TEXT NOT NULL,
    bulk_token_id TEXT,
    approved {bool} NOT NULL,
    blocked {bool} NOT NULL,
    registered_at BIGINT NOT NULL,
    last_seen_at BIGINT,
    last_seen_via TEXT
);
CREATE INDEX devices_hardware_id ON devices (hardware_id);
CREATE INDEX devices_cert_thumbprint ON devices (cert_thumbprint);

-- A registration whose hardware ID matched an existing record (ConfigMgr's "conflicting
-- record"). new_client_id has no foreign key: the row outlives the record a merge deletes.
CREATE TABLE device_conflicts (
    new_client_id TEXT PRIMARY KEY,
    existing_client_id TEXT NOT NULL REFERENCES devices (client_id),
    detected_at BIGINT NOT NULL,
    resolved_at BIGINT,
    resolution TEXT,
    CHECK (new_client_id <> existing_client_id)
);
CREATE INDEX device_conflicts_existing ON device_conflicts (existing_client_id);

CREATE TABLE management_points (
    role_id BIGINT PRIMARY KEY,
    name TEXT NOT NULL,
    url TEXT NOT NULL,
    allow_cmg_traffic {bool} NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE cmgs (
    name TEXT PRIMARY KEY,
    fqdn TEXT NOT NULL,
    instances INTEGER NOT NULL,
    definition TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE client_settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE traffic (
    cmg TEXT NOT NULL,
    connector TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    period_start BIGINT NOT NULL,
    requests BIGINT NOT NULL,
    bytes_in BIGINT NOT NULL,
    bytes_out BIGINT NOT NULL,
    PRIMARY KEY (cmg, connector, endpoint, period_start)
);

-- Delivery is idempotent per (client_id, message_id): a retried batch is not stored twice. `id`
-- only keeps the order of arrival (SQLite has no identity column outside the primary key).
-- client_id has no foreign key: the messages outlive a record that a merge deletes.
CREATE TABLE status_messages (
    id {id_pk},
    client_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    sent_at BIGINT NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    UNIQUE (client_id, message_id)
);

CREATE TABLE audit_log (
    id {id_pk},
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL
);

CREATE TABLE change_version (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version BIGINT NOT NULL
);
INSERT INTO change_version (id, version) VALUES (1, 0);
"#;

/// Schema version 2: connection points on other hosts (`cmg admin connector add`), each with a
/// certificate of its own in `certificates` (purpose `ConnectionPoint`). `name_key` is the name in
/// lower case, so that names are unique whatever their case. Removing one retires its
/// certificate and deletes the row.
const V2: &str = r#"
CREATE TABLE connection_points (
    name_key TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    thumbprint_sha256 TEXT NOT NULL UNIQUE REFERENCES certificates (thumbprint_sha256),
    created_at BIGINT NOT NULL,
    created_by TEXT NOT NULL
);
"#;

fn render(template: &str, backend: Backend) -> String {
    let (bool_t, blob_t, id_pk) = match backend {
        // BOOLEAN would be accepted by SQLite, but sqlx's `Any` driver refuses to read a column
        // declared that way; INTEGER 0/1 is what SQLite stores anyway.
        Backend::Sqlite => ("INTEGER", "BLOB", "INTEGER PRIMARY KEY AUTOINCREMENT"),
        Backend::Postgres => (
            "BOOLEAN",
            "BYTEA",
            "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
        ),
    };
    template
        .replace("{bool}", bool_t)
        .replace("{blob}", blob_t)
        .replace("{id_pk}", id_pk)
}

/// Key of the PostgreSQL advisory lock that serialises migrations between processes
/// (SQLite gets the same from `BEGIN IMMEDIATE`).
const MIGRATION_LOCK: i64 = 0x0063_6d67_5f6d_6967; // "cmg_mig"

/// Applies the missing migrations, each in its own transaction; returns the schema version.
/// Safe to run from several processes at once: each step re-checks under the write lock.
pub(crate) async fn run(db: &Db) -> Result<i64> {
    let latest = MIGRATIONS.last().map_or(0, |&(version, _)| version);
    for &(version, template) in MIGRATIONS {
        let failed = |source| StoreError::Migrate { version, source };
        let mut tx = db.begin_write().await.map_err(failed)?;
        if db.backend == Backend::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(MIGRATION_LOCK)
                .execute(&mut *tx)
                .await
                .map_err(failed)?;
        }
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS schema_migrations \
             (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .execute(&mut *tx)
        .await
        .map_err(failed)?;
        let current: Option<i64> = sqlx::query("SELECT MAX(version) AS v FROM schema_migrations")
            .fetch_one(&mut *tx)
            .await
            .and_then(|row| row.try_get("v"))
            .map_err(failed)?;
        let current = current.unwrap_or(0);
        if current > latest {
            return Err(StoreError::SchemaTooNew {
                found: current,
                supported: latest,
            });
        }
        if current >= version {
            continue;
        }
        sqlx::raw_sql(AssertSqlSafe(render(template, db.backend)))
            .execute(&mut *tx)
            .await
            .map_err(failed)?;
        sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)")
            .bind(version)
            .bind(now())
            .execute(&mut *tx)
            .await
            .map_err(failed)?;
        tx.commit().await.map_err(failed)?;
        tracing::info!(version, "site database schema migrated");
    }
    Ok(latest)
}
