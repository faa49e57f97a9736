//! The gateway's configuration file (TOML).
//!
//! ```toml
//! name = "GraniteFalls"
//! fqdn = "graniteFalls.example.com"
//! instance = 1
//! listen = "0.0.0.0:443"
//! tunnel_listen = "0.0.0.0:10140"
//! metrics_listen = "127.0.0.1:9140"
//! server_cert = "cmg.crt"      # PEM chain, relative to this file's directory
//! server_key = "cmg.key"
//! site_root = "site-root.crt"  # only connection points chaining to it may open a tunnel
//! log_dir = "logs"
//! stats_interval_secs = 60
//! crl_files = ["issuing-ca.crl"]   # PEM or DER; optional
//! crl_refresh_secs = 3600          # re-read files and re-fetch CRL distribution points
//! device_http2 = false             # offer HTTP/2 to devices besides HTTP/1.1
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::GatewayError;

/// Default period of the `CMGService.log` traffic summary.
pub const DEFAULT_STATS_INTERVAL_SECS: u64 = 60;
/// Default period of the CRL refresh (files re-read, distribution points fetched again).
pub const DEFAULT_CRL_REFRESH_SECS: u64 = 3600;
/// Most gateway instances per CMG (DESIGN §2).
pub const MAX_INSTANCES: u8 = 16;

/// Everything one gateway instance needs at start-up. The rest (keys, URL map, blocked lists,
/// TLS policy) arrives as settings over the tunnels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// The CMG's name, passed on to the site in `x-cmg-gateway`.
    pub name: String,
    /// The CMG's public host name (the server certificate's name).
    pub fqdn: String,
    /// Which instance of the CMG this is, 1–16.
    pub instance: u8,
    /// Device HTTPS (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Where connection points dial in (by convention 10140 + instance − 1).
    pub tunnel_listen: SocketAddr,
    /// Prometheus `GET /metrics` (plain HTTP); none when absent.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// PEM certificate chain of the CMG's server certificate.
    pub server_cert: PathBuf,
    /// PEM (PKCS#8) private key of the server certificate.
    pub server_key: PathBuf,
    /// PEM site root; tunnels are accepted only from certificates it issued.
    pub site_root: PathBuf,
    /// Where `CMGHttpHandler.log` and `CMGService.log` go.
    pub log_dir: PathBuf,
    /// Period of the traffic summary in `CMGService.log`.
    #[serde(default = "default_stats_interval")]
    pub stats_interval_secs: u64,
    /// CRL files (PEM or DER) for PKI client certificates, besides those fetched from the CRL
    /// distribution points of the trusted CAs and of client certificates (DESIGN §4).
    #[serde(default)]
    pub crl_files: Vec<PathBuf>,
    /// How often CRLs are re-read and re-fetched; also whenever a CRL's nextUpdate passes.
    #[serde(default = "default_crl_refresh")]
    pub crl_refresh_secs: u64,
    /// Offer HTTP/2 to devices (ALPN) besides HTTP/1.1. Off by default: a device sends one
    /// request at a time, so HTTP/2 gains it nothing, while an idle HTTP/2 connection costs
    /// the gateway about twice the memory of an idle HTTP/1.1 one.
    #[serde(default)]
    pub device_http2: bool,
}

fn default_crl_refresh() -> u64 {
    DEFAULT_CRL_REFRESH_SECS
}

fn default_stats_interval() -> u64 {
    DEFAULT_STATS_INTERVAL_SECS
}

impl GatewayConfig {
    /// The application protocols offered to devices, preferred first.
    pub fn device_alpn(&self) -> &'static [&'static [u8]] {
        if self.device_http2 {
            &[b"h2", b"http/1.1"]
        } else {
            &[b"http/1.1"]
        }
    }

    /// Reads a TOML file; relative paths in it are taken from the file's directory.
    pub fn load(path: &Path) -> Result<GatewayConfig, GatewayError> {
        let text = std::fs::read_to_string(path).map_err(|source| GatewayError::Read {
            what: "the gateway configuration",
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::parse(&text).map_err(|reason| GatewayError::Config {
            path: Some(path.to_owned()),
            reason,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config.validate().map_err(|reason| GatewayError::Config {
            path: Some(path.to_owned()),
            reason,
        })?;
        Ok(config)
    }

    /// Parses TOML text without touching the file system.
    pub fn parse(text: &str) -> Result<GatewayConfig, String> {
        toml::from_str(text).map_err(|e| {
            format!(
                "{}; expected the keys name, fqdn, instance, listen, tunnel_listen, \
                 server_cert, server_key, site_root, log_dir (and optionally metrics_listen, \
                 stats_interval_secs, crl_files, crl_refresh_secs, device_http2)",
                e.to_string().trim_end()
            )
        })
    }

    /// Makes relative paths relative to `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        for p in [
            &mut self.server_cert,
            &mut self.server_key,
            &mut self.site_root,
            &mut self.log_dir,
        ]
        .into_iter()
        .chain(self.crl_files.iter_mut())
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    /// Checks the values that TOML types cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.trim().is_empty() {
            return Err("'name' must name the CMG, e.g. name = \"GraniteFalls\"".into());
        }
        if self.name.chars().any(|c| c.is_control()) {
            return Err("'name' must not contain control characters".into());
        }
        if self.fqdn.trim().is_empty() || self.fqdn.contains(['/', ' ', ':']) {
            return Err(format!(
                "'fqdn' must be a host name such as cmg.example.com, not '{}'",
                self.fqdn
            ));
        }
        if !(1..=MAX_INSTANCES).contains(&self.instance) {
            return Err(format!(
                "'instance' must be between 1 and {MAX_INSTANCES}, not {}",
                self.instance
            ));
        }
        if self.stats_interval_secs == 0 {
            return Err("'stats_interval_secs' must be at least 1".into());
        }
        if self.crl_refresh_secs < 10 {
            return Err("'crl_refresh_secs' must be at least 10".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
        name = "GraniteFalls"
        fqdn = "cmg.example.com"
        instance = 2
        listen = "127.0.0.1:0"
        tunnel_listen = "127.0.0.1:0"
        server_cert = "cmg.crt"
        server_key = "/etc/cmg/cmg.key"
        site_root = "site-root.crt"
        log_dir = "logs"
    "#;

    #[test]
    fn loads_toml_with_defaults_and_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, SAMPLE).unwrap();
        let config = GatewayConfig::load(&path).unwrap();
        assert_eq!(config.instance, 2);
        assert_eq!(config.metrics_listen, None);
        assert_eq!(config.stats_interval_secs, DEFAULT_STATS_INTERVAL_SECS);
        assert_eq!(config.server_cert, dir.path().join("cmg.crt"));
        assert_eq!(config.server_key, PathBuf::from("/etc/cmg/cmg.key"));
        assert_eq!(config.log_dir, dir.path().join("logs"));
        assert!(config.crl_files.is_empty());
        assert_eq!(config.crl_refresh_secs, DEFAULT_CRL_REFRESH_SECS);
        std::fs::write(
            &path,
            format!("{SAMPLE}\ncrl_files = [\"ca.crl\", \"/etc/ca2.crl\"]\ncrl_refresh_secs = 60"),
        )
        .unwrap();
        let config = GatewayConfig::load(&path).unwrap();
        assert_eq!(
            config.crl_files,
            vec![dir.path().join("ca.crl"), PathBuf::from("/etc/ca2.crl")]
        );
        assert_eq!(config.crl_refresh_secs, 60);
    }

    #[test]
    fn unknown_keys_and_bad_values_say_what_to_fix() {
        let err = GatewayConfig::parse(&format!("{SAMPLE}\nlisten_port = 1")).unwrap_err();
        assert!(err.contains("listen_port"), "{err}");
        let mut config = GatewayConfig::parse(SAMPLE).unwrap();
        config.instance = 17;
        assert!(config.validate().unwrap_err().contains("between 1 and 16"));
        config.instance = 1;
        config.fqdn = "https://x".into();
        assert!(config.validate().unwrap_err().contains("fqdn"));
        let dir = tempfile::tempdir().unwrap();
        let missing = GatewayConfig::load(&dir.path().join("none.toml")).unwrap_err();
        assert!(missing.to_string().contains("none.toml"), "{missing}");
    }
}
