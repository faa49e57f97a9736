//! The tunnel between a gateway instance and a connection point (DESIGN §6).
//!
//! The connection point dials **out** over TLS to the gateway's tunnel port with its
//! site-issued certificate. On that connection the roles are reversed: the connection point is
//! the HTTP/2 *server*, the gateway the HTTP/2 *client*. Over it the gateway sends
//!
//! - device requests, unchanged in method, path (`/CCM_Proxy_MutualAuth/<role ID>/<endpoint>`),
//!   query and body, plus the relay headers of [`crate::mp::relay`] naming what it verified;
//!   the device's `Authorization` value travels at the front of the request's data, its length
//!   in [`CREDENTIAL_LENGTH`] (see there why not in a header);
//! - `GET` [`SETTINGS`]`?after=<version>`: a long poll answered with [`GatewaySettings`] as soon
//!   as the site's settings version is greater than `after` (at once when `after` is absent),
//!   or `204 No Content` after [`LONG_POLL_SECS`];
//! - `GET` [`HEALTH`]: `200` while the connection point can reach a management point.

use serde::{Deserialize, Serialize};

/// Long poll for the CMG's settings.
pub const SETTINGS: &str = "/_cmg/settings";
/// Health of the connection point behind this tunnel.
pub const HEALTH: &str = "/_cmg/health";
/// How long a settings long poll waits before answering 204.
pub const LONG_POLL_SECS: u64 = 25;

/// On a relayed device request: how many bytes at the front of the request's data are the
/// device's `Authorization` value (the body follows them). The connection point hands it to the
/// management point as the `Authorization` header again.
///
/// Why not a header on the tunnel: HPACK would have to Huffman-code the token (nearly 900 bytes)
/// on every request at the gateway and decode it at the connection point, never indexed since
/// the tunnel's header table is shared by every device (RFC 7541 §7.1). Moving it to the data
/// took 8 % off the instructions the gateway + tunnel hop adds per request (callgrind, see
/// docs/gateway.md). In the data it is only copied, and TLS protects it as it did the header.
pub const CREDENTIAL_LENGTH: &str = "x-cmg-credential-length";
/// The largest credential a connection point takes from a tunnel: the gateway's limit on a
/// device's whole request head.
pub const MAX_CREDENTIAL_BYTES: usize = 16 * 1024;

/// Route prefixes a device uses through a gateway (DESIGN §5.1); both mean the same.
pub const PROXY_PREFIXES: [&str; 2] = ["/CCM_Proxy_MutualAuth/", "/CCM_Proxy_ServerAuth/"];
/// Answered by the gateway itself, without authentication.
pub const SERVICE_METADATA: &str = "/CCM_Proxy_MutualAuth/ServiceMetadata";

/// Everything a gateway instance needs to authenticate devices and route their requests. It
/// holds no device data and no secret: only public keys, certificates and identifiers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySettings {
    /// The site's change version these settings were built from.
    pub version: i64,
    /// The CMG's name.
    pub cmg: String,
    /// Hierarchy GUID: the tokens' `TenantId` and issuer.
    pub hierarchy_id: String,
    /// The site's token verification keys (a JWKS document).
    pub jwks: serde_json::Value,
    /// `UniqueId`s of blocked bulk registration tokens.
    pub blocked_bulk_tokens: Vec<String>,
    /// Client IDs of blocked devices.
    pub blocked_devices: Vec<String>,
    /// Endpoints devices may reach through the gateway, e.g. `/CCM_STS` (DESIGN §5.2); anything
    /// else is refused with 404 at the gateway.
    pub url_map: Vec<String>,
    /// MP role IDs that accept CMG traffic.
    pub management_points: Vec<i64>,
    /// PEM certificates (roots and intermediates) that PKI client certificates must chain to.
    pub trusted_cas: Vec<String>,
    /// Check PKI client certificates against CRLs.
    pub crl_check: bool,
    /// `"1.2"` or `"1.3"`.
    pub min_tls: String,
}

/// Splits `/CCM_Proxy_MutualAuth/<role ID>/<endpoint>` (or `…ServerAuth…`) into the role ID and
/// the endpoint with its leading `/`. `None` for any other path.
pub fn split_proxy_path(path: &str) -> Option<(i64, &str)> {
    let rest = PROXY_PREFIXES.iter().find_map(|p| path.strip_prefix(p))?;
    let slash = rest.find('/')?;
    let (role, endpoint) = rest.split_at(slash);
    if role.is_empty() || !role.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((role.parse().ok()?, endpoint))
}

#[cfg(test)]
mod tests {
    use super::split_proxy_path;

    #[test]
    fn proxy_paths_split_into_role_and_endpoint() {
        assert_eq!(
            split_proxy_path("/CCM_Proxy_MutualAuth/72186325152220500/CCM_STS"),
            Some((72186325152220500, "/CCM_STS"))
        );
        assert_eq!(
            split_proxy_path("/CCM_Proxy_ServerAuth/1/SMS_MP/.sms_aut"),
            Some((1, "/SMS_MP/.sms_aut"))
        );
        for bad in [
            "/CCM_Proxy_MutualAuth/ServiceMetadata",
            "/CCM_Proxy_MutualAuth/12",
            "/CCM_Proxy_MutualAuth//CCM_STS",
            "/CCM_Proxy_MutualAuth/-1/CCM_STS",
            "/CCM_Proxy_MutualAuth/99999999999999999999/CCM_STS",
            "/CCM_STS",
        ] {
            assert_eq!(split_proxy_path(bad), None, "{bad}");
        }
    }
}
