use std::path::PathBuf;

/// What went wrong in a site operation, worded for the admin: what happened and what to do.
#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    #[error("'{0}' is not a valid site code: it must be exactly three letters or digits, e.g. ABC")]
    BadSiteCode(String),
    #[error(
        "a site already exists in {0}; a site is created once — use it, or choose another --data directory"
    )]
    AlreadyInitialised(PathBuf),
    #[error(
        "there is no site in {0}; create one with `cmg site init --site-code ABC --data {0}` or point --data (or CMG_DATA) at an existing site"
    )]
    NotInitialised(PathBuf),
    #[error("cannot read the site configuration {path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the lifetime '{0}' is not allowed: give a whole number of minutes from 1 to 10080 (7 days); the default is 4320 (3 days)"
    )]
    BadLifetime(String),
    #[error("'{0}' is not a GUID; copy the GUID exactly as `cmg bulk-token list` shows it")]
    BadGuid(String),
    #[error("no management point with role ID {0} on this site; `cmg admin mp list` shows them")]
    UnknownMp(i64),
    #[error("setting '{name}': {reason}")]
    BadSetting { name: String, reason: String },
    #[error("'{0}' is not a client ID; copy it as `cmg admin device list` shows it (GUID:…)")]
    BadClientId(String),
    #[error("the site database and the site's files disagree: {0}")]
    Inconsistent(String),
    #[error("no token signing certificate {0} on this site; `cmg bulk-token list` shows them")]
    UnknownSigningKey(String),
    #[error(
        "{0} is the certificate that signs new tokens; rotate to a new one first (`cmg site token-key rotate`)"
    )]
    RetireActiveSigner(String),
    #[error(
        "{what} is not available here: this site was opened for a connection point, which holds none of the site's private keys; do this on the site server"
    )]
    NoSiteKeys { what: &'static str },
    #[error(
        "{0} is a connection point's directory (written by `cmg admin connector add`) and holds none of the site's keys: use it only with `cmg connector run --data {0}`; run site and admin commands on the site server, against the site's data directory"
    )]
    ConnectionPointDirectory(PathBuf),
    #[error(
        "'{0}' is not a valid connection point name: use 1 to 63 letters, digits, '-', '_' or '.', starting with a letter or digit (e.g. the host's name, CP2 or cp2.contoso.com)"
    )]
    BadConnectionPointName(String),
    #[error(
        "a connection point named {0} already exists; choose another name, or remove it first with `cmg admin connector remove {0}`"
    )]
    ConnectionPointExists(String),
    #[error(
        "no connection point named {0}; `cmg admin connector list` shows them (the site server's own connection point has no name and is not removed this way)"
    )]
    UnknownConnectionPoint(String),
    #[error(
        "the site's database is SQLite ({0}), a file on this machine that another host cannot share: a connection point on another host needs the site database on PostgreSQL (`cmg site init --db postgres://…`). If the connection point runs on this machine, give --same-host"
    )]
    SqliteNotShared(String),
    #[error(
        "{0} already exists and is not empty; give a new or empty directory for the connection point's files"
    )]
    OutNotEmpty(PathBuf),
    #[error(transparent)]
    Pki(#[from] cmg_pki::PkiError),
    #[error(transparent)]
    Key(#[from] cmg_token::KeyError),
    #[error(transparent)]
    Mint(#[from] cmg_token::MintError),
    #[error(transparent)]
    Store(#[from] cmg_store::StoreError),
}

impl SiteError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| SiteError::Io {
            action,
            path,
            source,
        }
    }
}
