//! Cloud management gateway definitions (DESIGN §2, §6): what `cmg admin cmg create` records,
//! and the ready-to-run configuration it writes for each gateway instance.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{DataDir, SiteError};

/// Tunnel port of instance 1; instance n listens on `TUNNEL_BASE_PORT + n - 1` (DESIGN §2).
pub const TUNNEL_BASE_PORT: u16 = 10140;
/// Most instances per CMG.
pub const MAX_INSTANCES: u8 = 16;
/// ConfigMgr's documented limit on trusted CA certificates: 2 roots and 4 intermediates.
pub const DOCUMENTED_CA_LIMIT: (usize, usize) = (2, 4);

/// A CMG as the site records it (JSON in the `cmgs` table). Public material only: the server
/// key lives in the instance directory, never in the database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CmgDefinition {
    pub name: String,
    /// The name devices connect to; the server certificate must cover it.
    pub fqdn: String,
    pub instances: u8,
    /// Where the connection point dials the tunnels (default: the FQDN).
    pub tunnel_host: String,
    /// The server authentication certificate chain (PEM), leaf first.
    pub server_chain_pem: String,
    /// PEM certificates that PKI client certificates must chain to.
    pub trusted_cas: Vec<String>,
    /// Check PKI client certificates against CRLs (on by default).
    pub crl_check: bool,
    /// `1.2` or `1.3`.
    pub min_tls: String,
    /// 14-day outbound data alert threshold, in GB (DESIGN §2).
    pub data_alert_gb: u64,
    /// Stop the service when the critical threshold (90 %) is reached.
    pub stop_at_critical: bool,
    /// Device HTTPS port of every instance.
    pub device_port: u16,
}

impl CmgDefinition {
    /// The definition a row of the `cmgs` table holds.
    pub fn from_record(record: &cmg_store::CmgRecord) -> Result<CmgDefinition, SiteError> {
        serde_json::from_str(&record.definition).map_err(|e| {
            SiteError::Inconsistent(format!(
                "the definition of CMG {} cannot be read: {e}",
                record.name
            ))
        })
    }

    /// Checks the definition; returns warnings an admin should read (not errors).
    pub fn validate(&self) -> Result<Vec<String>, SiteError> {
        let bad = |field: &str, reason: String| SiteError::BadSetting {
            name: field.into(),
            reason,
        };
        if self.name.is_empty()
            || self.name.len() > 63
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(bad("name", "use 1 to 63 letters, digits or '-'".into()));
        }
        if !(1..=MAX_INSTANCES).contains(&self.instances) {
            return Err(bad(
                "instances",
                format!(
                    "{} is not allowed; use 1 to {MAX_INSTANCES}",
                    self.instances
                ),
            ));
        }
        if !matches!(self.min_tls.as_str(), "1.2" | "1.3") {
            return Err(bad(
                "min_tls",
                format!("'{}' is not allowed; use 1.2 or 1.3", self.min_tls),
            ));
        }
        let leaf = cmg_pki::pem_to_der(&self.server_chain_pem, "the server certificate")?;
        let names = cmg_pki::dns_names(&leaf)?;
        if !names.iter().any(|n| cmg_pki::name_matches(n, &self.fqdn)) {
            return Err(bad(
                "fqdn",
                format!(
                    "the server certificate is for {} and does not cover {}; choose a host name it covers",
                    names.join(", "),
                    self.fqdn
                ),
            ));
        }
        let mut warnings = Vec::new();
        let (roots, intermediates) = cmg_pki::count_roots(&self.trusted_cas)?;
        if roots > DOCUMENTED_CA_LIMIT.0 || intermediates > DOCUMENTED_CA_LIMIT.1 {
            warnings.push(format!(
                "{roots} root and {intermediates} intermediate CA certificates are trusted; ConfigMgr documents at most {} and {} — cmg accepts more, but check that each is needed",
                DOCUMENTED_CA_LIMIT.0, DOCUMENTED_CA_LIMIT.1
            ));
        }
        Ok(warnings)
    }

    /// `(host, port)` of each instance's tunnel endpoint.
    pub fn tunnel_endpoints(&self) -> Vec<(String, u16)> {
        (0..self.instances)
            .map(|i| (self.tunnel_host.clone(), TUNNEL_BASE_PORT + u16::from(i)))
            .collect()
    }
}

/// `fqdn`, or `fqdn:port` when devices do not use 443: the host part of the CMG's URLs.
pub fn public_host(record: &cmg_store::CmgRecord) -> String {
    match serde_json::from_str::<CmgDefinition>(&record.definition) {
        Ok(def) if def.device_port != 443 => format!("{}:{}", record.fqdn, def.device_port),
        _ => record.fqdn.clone(),
    }
}

/// Where `cmg admin cmg create` writes the instances' files: `<data>/cmg/<name>/`.
pub fn instance_dir(data: &DataDir, name: &str) -> PathBuf {
    data.root().join("cmg").join(name)
}

/// Writes everything an instance needs to run with `cmg gateway run --config FILE`: the server
/// certificate chain and key (0600), the site root that tunnels must chain to, and one TOML file
/// per instance. Returns the config files.
pub(crate) fn write_instance_configs(
    data: &DataDir,
    def: &CmgDefinition,
    server_key_pem: &str,
) -> Result<Vec<PathBuf>, SiteError> {
    let dir = instance_dir(data, &def.name);
    std::fs::create_dir_all(&dir).map_err(SiteError::io("create directory", &dir))?;
    let write = |name: &str, text: &str| -> Result<PathBuf, SiteError> {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(SiteError::io("write", &path))?;
        Ok(path)
    };
    cmg_pki::write_private_file(&dir.join("server.key"), server_key_pem.as_bytes())?;
    write("server.crt", &def.server_chain_pem)?;
    let root = read(&data.pki_dir().join("site-root.crt"))?;
    write("site-root.crt", &root)?;
    (1..=def.instances)
        .map(|n| {
            let config = format!(
                "# Gateway instance {n} of CMG {name}: `cmg gateway run --config {file}`\n\
                 name = \"{name}\"\nfqdn = \"{fqdn}\"\ninstance = {n}\n\
                 listen = \"0.0.0.0:{port}\"\ntunnel_listen = \"0.0.0.0:{tunnel}\"\n\
                 server_cert = \"server.crt\"\nserver_key = \"server.key\"\nsite_root = \"site-root.crt\"\n\
                 log_dir = \"logs-{n}\"\n\
                 # Devices speak HTTP/1.1; `device_http2 = true` offers HTTP/2 as well.\n\
                 # device_http2 = false\n",
                name = def.name,
                fqdn = def.fqdn,
                file = dir.join(format!("instance-{n}.toml")).display(),
                port = def.device_port,
                tunnel = TUNNEL_BASE_PORT + u16::from(n) - 1,
            );
            write(&format!("instance-{n}.toml"), &config)
        })
        .collect()
}

fn read(path: &Path) -> Result<String, SiteError> {
    std::fs::read_to_string(path).map_err(SiteError::io("read", path))
}

/// How long the outbound data alert looks back (DESIGN §2).
pub const ALERT_WINDOW_SECS: i64 = 14 * 86_400;

/// The 14-day outbound data alert state of a CMG.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum AlertLevel {
    Normal,
    /// At least 50 % of the threshold.
    Warning,
    /// At least 90 % of the threshold.
    Critical,
}

impl AlertLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertLevel::Normal => "normal",
            AlertLevel::Warning => "warning (50 % of the threshold)",
            AlertLevel::Critical => "critical (90 % of the threshold)",
        }
    }
}

/// The alert level of `bytes_out` against a threshold of `threshold_gb` (10^9 bytes each).
pub fn alert_level(bytes_out: i64, threshold_gb: u64) -> AlertLevel {
    let threshold = u128::from(threshold_gb) * 1_000_000_000;
    let used = u128::try_from(bytes_out.max(0)).unwrap_or(0) * 100;
    if threshold > 0 && used >= threshold * 90 {
        AlertLevel::Critical
    } else if threshold > 0 && used >= threshold * 50 {
        AlertLevel::Warning
    } else {
        AlertLevel::Normal
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alert_levels_at_50_and_90_percent() {
        assert_eq!(alert_level(0, 10_000), AlertLevel::Normal);
        assert_eq!(alert_level(4_999_999_999_999, 10_000), AlertLevel::Normal);
        assert_eq!(alert_level(5_000_000_000_000, 10_000), AlertLevel::Warning);
        assert_eq!(alert_level(9_000_000_000_000, 10_000), AlertLevel::Critical);
        assert_eq!(alert_level(900, 0), AlertLevel::Normal);
    }
}
