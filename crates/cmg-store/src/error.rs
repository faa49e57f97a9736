use std::sync::Arc;

use sqlx::error::ErrorKind;

/// The result of every store operation.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// What went wrong in the site database, worded for the admin who has to fix it.
///
/// Messages never contain secrets: database URLs are shown with their password redacted.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "unsupported site database URL `{url}` — use sqlite://PATH (embedded) or postgres://USER@HOST/DATABASE"
    )]
    UnsupportedUrl { url: String },

    #[error(
        "cannot open the site database at {url}: {source} — check the --db URL, that the database server is reachable, and the permissions"
    )]
    Open {
        url: String,
        #[source]
        source: sqlx::Error,
    },

    #[error(
        "cannot bring the site database schema to version {version}: {source} — the database was left at the previous version; fix the cause and start again"
    )]
    Migrate {
        version: i64,
        #[source]
        source: sqlx::Error,
    },

    #[error(
        "the site database has schema version {found} but this cmg knows only up to {supported} — it was upgraded by a newer cmg; run that version"
    )]
    SchemaTooNew { found: i64, supported: i64 },

    #[error(
        "site database error while {action}: {source} — check that the database is reachable and has free space"
    )]
    Database {
        action: &'static str,
        #[source]
        source: Arc<sqlx::Error>,
    },

    #[error(
        "the site database holds a value this cmg cannot read in {column}: {detail} — was the database edited by hand or written by a newer cmg?"
    )]
    Corrupt {
        column: &'static str,
        detail: String,
    },

    #[error(
        "this database already holds a site — a site is initialised once; use it, or point --db at a new database"
    )]
    SiteExists,

    #[error("{what} {id} already exists in the site database")]
    AlreadyExists { what: &'static str, id: String },

    #[error("a device with client ID {0} is already registered")]
    DeviceExists(String),

    #[error("no {what} {id} in the site database — check the ID against the list")]
    NotFound { what: &'static str, id: String },

    #[error("the site database has been closed (the site is shutting down)")]
    Closed,
}

impl StoreError {
    pub(crate) fn database(action: &'static str, source: Arc<sqlx::Error>) -> Self {
        match *source {
            sqlx::Error::PoolClosed => StoreError::Closed,
            _ => StoreError::Database { action, source },
        }
    }

    /// For `map_err`: the failed step, phrased as "while <action>".
    pub(crate) fn while_(action: &'static str) -> impl FnOnce(sqlx::Error) -> Self {
        move |e| Self::database(action, Arc::new(e))
    }
}

pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| matches!(d.kind(), ErrorKind::UniqueViolation))
}

pub(crate) fn is_foreign_key_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| matches!(d.kind(), ErrorKind::ForeignKeyViolation))
}

/// A constraint failure caused by one row's values (as opposed to the database being unreachable
/// or busy): retrying the other rows of its batch on their own can succeed.
pub(crate) fn is_row_violation(e: &sqlx::Error) -> bool {
    e.as_database_error().is_some_and(|d| {
        matches!(
            d.kind(),
            ErrorKind::UniqueViolation
                | ErrorKind::ForeignKeyViolation
                | ErrorKind::NotNullViolation
                | ErrorKind::CheckViolation
        )
    })
}

/// `url` with any password (in the user info or a `password=` query parameter) replaced by `***`.
/// Errs on the side of hiding: everything up to the last `@` counts as user info, so a password
/// holding an unescaped `/`, `?` or `@` is still hidden.
pub(crate) fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), url),
    };
    let (userinfo, host_and_rest) = match rest.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => (format!("{user}:***@"), host),
            None => (format!("{userinfo}@"), host),
        },
        None => (String::new(), rest),
    };
    let tail = match host_and_rest.split_once('?') {
        Some((path, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|param| match param.split_once('=') {
                    Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
                    _ => param.to_owned(),
                })
                .collect();
            format!("{path}?{}", params.join("&"))
        }
        None => host_and_rest.to_owned(),
    };
    format!("{scheme}{userinfo}{tail}")
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://cmg:s3cr%40t@db.example:5432/site?sslmode=require"),
            "postgres://cmg:***@db.example:5432/site?sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://cmg@db/site?password=s3cret&sslmode=require"),
            "postgres://cmg@db/site?password=***&sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://cmg@db/site"),
            "postgres://cmg@db/site"
        );
        assert_eq!(
            redact_url("postgres://cmg:pa/ss?w@rd@db/site"),
            "postgres://cmg:***@db/site"
        );
        assert_eq!(redact_url("cmg:pass@db/site"), "cmg:***@db/site");
        assert_eq!(
            redact_url("sqlite:///var/lib/cmg/site.db"),
            "sqlite:///var/lib/cmg/site.db"
        );
    }
}
