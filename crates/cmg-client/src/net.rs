//! HTTPS to management points, on the intranet or through a CMG: the client's certificate as
//! the TLS identity, the configured roots, host overrides, and the MP's JSON error bodies.

use std::net::SocketAddr;
use std::time::Duration;

use cmg_proto::mp::ErrorBody;
use serde::de::DeserializeOwned;

use crate::RemoteError;

/// The roots and identity a client connects with.
pub(crate) struct HttpConfig<'a> {
    /// Certificate and PKCS#8 key, PEM.
    pub identity_pem: &'a [u8],
    /// PEM roots that replace the system's; `None`: the system's roots.
    pub roots_pem: Option<&'a str>,
    pub resolve: &'a [(String, SocketAddr)],
    pub timeout: Duration,
}

/// How long an idle connection is kept for the next request (below the gateway's 10 s).
const IDLE_CONNECTION: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub(crate) struct Http {
    client: reqwest::Client,
    resolve: Vec<(String, SocketAddr)>,
}

impl Http {
    pub fn build(config: &HttpConfig<'_>) -> Result<Http, String> {
        let identity = reqwest::Identity::from_pem(config.identity_pem)
            .map_err(|e| format!("the client certificate or key is not usable: {e}"))?;
        let mut builder = reqwest::Client::builder()
            .identity(identity)
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(10)))
            // The gateway closes an HTTP/1.1 connection after 10 s without a request; letting
            // ours go first means no request is sent on a connection the gateway is closing.
            .pool_idle_timeout(IDLE_CONNECTION);
        if let Some(pem) = config.roots_pem {
            let roots = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
                .map_err(|e| format!("the trusted root certificates are not valid PEM: {e}"))?;
            if roots.is_empty() {
                return Err("the trusted root file holds no certificate".into());
            }
            builder = builder.tls_certs_only(roots);
        }
        for (host, addr) in config.resolve {
            builder = builder.resolve(host, *addr);
        }
        let client = builder
            .build()
            .map_err(|e| format!("cannot set up HTTPS: {}", cmg_log::error_chain(&e)))?;
        Ok(Http {
            client,
            resolve: config.resolve.to_vec(),
        })
    }

    /// `base` + `endpoint`, with the port of a `--resolve` entry when `base` names none
    /// (the location answer lists a CMG by its name only).
    pub fn url(&self, base: &str, endpoint: &str) -> String {
        format!("{}{endpoint}", effective_base(base, &self.resolve))
    }

    pub fn get(&self, url: &str) -> reqwest::RequestBuilder {
        self.client.get(url)
    }

    pub fn post(&self, url: &str) -> reqwest::RequestBuilder {
        self.client.post(url)
    }
}

/// The base URL as it is dialled: trailing slash removed, port from a `--resolve` entry added.
pub(crate) fn effective_base(base: &str, resolve: &[(String, SocketAddr)]) -> String {
    let base = base.trim_end_matches('/');
    let Some(rest) = base.strip_prefix("https://") else {
        return base.to_owned();
    };
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    if authority.contains(':') {
        return base.to_owned();
    }
    match resolve
        .iter()
        .find(|(host, _)| host.eq_ignore_ascii_case(authority))
    {
        Some((_, addr)) if addr.port() != 443 => {
            let sep = if path.is_empty() { "" } else { "/" };
            format!("https://{authority}:{}{sep}{path}", addr.port())
        }
        _ => base.to_owned(),
    }
}

/// Sends a request and decodes a JSON answer; a refusal becomes [`RemoteError::Server`] with
/// the MP's or the gateway's error code.
pub(crate) async fn call<T: DeserializeOwned>(
    url: &str,
    request: reqwest::RequestBuilder,
) -> Result<T, RemoteError> {
    let response = request.send().await.map_err(|e| RemoteError::Unreachable {
        url: url.to_owned(),
        reason: cmg_log::error_chain(&e),
    })?;
    let status = response.status();
    let bytes = response
        .bytes()
        .await
        .map_err(|e| RemoteError::Unreachable {
            url: url.to_owned(),
            reason: cmg_log::error_chain(&e),
        })?;
    if !status.is_success() {
        return Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => RemoteError::Server {
                url: url.to_owned(),
                status: status.as_u16(),
                code: body.error,
                message: body.message,
                action: body.action,
            },
            Err(_) => RemoteError::Http {
                url: url.to_owned(),
                status: status.as_u16(),
            },
        });
    }
    serde_json::from_slice(&bytes).map_err(|e| RemoteError::BadAnswer {
        url: url.to_owned(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resolved_name_without_port_gets_the_overridden_port() {
        let resolve = vec![(
            "cmg.contoso.com".to_owned(),
            "127.0.0.1:8443".parse().unwrap(),
        )];
        assert_eq!(
            effective_base("https://CMG.contoso.com/CCM_Proxy_MutualAuth/7/", &resolve),
            "https://CMG.contoso.com:8443/CCM_Proxy_MutualAuth/7"
        );
        assert_eq!(
            effective_base("https://cmg.contoso.com:9/CCM_Proxy_MutualAuth/7", &resolve),
            "https://cmg.contoso.com:9/CCM_Proxy_MutualAuth/7"
        );
        assert_eq!(
            effective_base("https://other.example", &resolve),
            "https://other.example"
        );
        assert_eq!(
            effective_base("https://cmg.contoso.com", &resolve),
            "https://cmg.contoso.com:8443"
        );
    }
}
