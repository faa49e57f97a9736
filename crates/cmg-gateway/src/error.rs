//! Errors: [`GatewayError`] when the gateway cannot start, [`RelayError`] when one device request
//! cannot be served, tagged by where it went wrong (the device, the tunnel, or the gateway) so the
//! logs and metrics tell an admin whom to look at.

use std::fmt;
use std::path::PathBuf;

use cmg_proto::mp::ErrorBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Response, StatusCode, header};

/// The body of every response the gateway sends to a device: its own JSON, or a relayed stream.
pub(crate) type Body = http_body_util::combinators::BoxBody<Bytes, h2::Error>;

pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{} is not a valid gateway configuration: {reason}", path.as_ref().map_or_else(|| "the configuration".to_owned(), |p| p.display().to_string()))]
    Config {
        path: Option<PathBuf>,
        reason: String,
    },
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the TLS set-up failed: {0}")]
    Tls(#[from] cmg_pki::PkiError),
    #[error("cannot listen on {addr} ({what}): {source}; is another process using the port?")]
    Listen {
        what: &'static str,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot open the log directory {path}: {source}")]
    Logs {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The answer to a request the gateway refused or could not relay: a status and the JSON body of
/// DESIGN §4. Never carries a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub status: StatusCode,
    pub body: ErrorBody,
    /// Seconds for `Retry-After`.
    pub retry_after: Option<u32>,
    /// The rule that failed, for the log (e.g. a token refusal's rule).
    pub rule: Option<&'static str>,
}

impl Denial {
    pub fn new(
        status: StatusCode,
        code: &str,
        message: impl Into<String>,
        action: impl Into<String>,
    ) -> Self {
        Denial {
            status,
            body: ErrorBody {
                error: code.into(),
                message: message.into(),
                action: action.into(),
            },
            retry_after: None,
            rule: None,
        }
    }

    pub fn with_rule(mut self, rule: &'static str) -> Self {
        self.rule = Some(rule);
        self
    }

    pub fn with_retry_after(mut self, secs: u32) -> Self {
        self.retry_after = Some(secs);
        self
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.body.error,
            self.body.message
        )?;
        if let Some(rule) = self.rule {
            write!(f, " [rule {rule}]")?;
        }
        Ok(())
    }
}

/// One device request that was not relayed, by origin (pingora style).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    /// The device's request was refused: URL, certificate, token, size, time.
    #[error("refused the device's request: {0}")]
    Downstream(Denial),
    /// No tunnel could carry it, or the connection point failed.
    #[error("the tunnel failed: {0}")]
    Upstream(Denial),
    /// The gateway itself failed.
    #[error("the gateway failed: {0}")]
    Internal(Denial),
}

impl RelayError {
    pub fn denial(&self) -> &Denial {
        match self {
            RelayError::Downstream(d) | RelayError::Upstream(d) | RelayError::Internal(d) => d,
        }
    }

    pub fn origin(&self) -> &'static str {
        match self {
            RelayError::Downstream(_) => "device",
            RelayError::Upstream(_) => "tunnel",
            RelayError::Internal(_) => "gateway",
        }
    }

    pub(crate) fn into_response(self) -> Response<Body> {
        let denial = match self {
            RelayError::Downstream(d) | RelayError::Upstream(d) | RelayError::Internal(d) => d,
        };
        json_response(denial.status, &denial.body, denial.retry_after)
    }

    pub(crate) fn internal(e: impl fmt::Display) -> Self {
        RelayError::Internal(Denial::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "CMGService_Internal_Error",
            format!("the gateway could not complete the request: {e}"),
            "retry later; the admin finds the cause in CMGHttpHandler.log",
        ))
    }
}

pub(crate) fn json_response<T: serde::Serialize>(
    status: StatusCode,
    body: &T,
    retry_after: Option<u32>,
) -> Response<Body> {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut builder = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(secs) = retry_after {
        builder = builder.header(header::RETRY_AFTER, secs);
    }
    builder.body(full(bytes)).unwrap_or_else(|_| {
        let mut r = Response::new(full(Bytes::new()));
        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        r
    })
}
