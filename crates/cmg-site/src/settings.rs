//! Site and client settings (DESIGN §2): their names, defaults, allowed values and parsing.
//! The store keeps them as name/value text; everything that reads them goes through
//! [`SiteSettings`], so a bad value can never reach a running role.

use std::collections::BTreeMap;
use std::fmt;

use cmg_proto::mp::ClientPolicy;

use crate::SiteError;

/// How a device that registers is approved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApprovalMode {
    /// Every registered device may get a token at once (ConfigMgr's default for token clients).
    Automatic,
    /// New devices wait for `cmg admin device approve`.
    Manual,
}

/// What happens when a known hardware ID registers with another certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConflictHandling {
    /// Create a new record and list the conflict for the admin (ConfigMgr's default).
    NewRecord,
    /// The new certificate takes over the existing client ID; tokens bound to the old one die.
    TakeOver,
}

/// Every setting with its current value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteSettings {
    pub enable_cmg: bool,
    pub policy_interval_secs: u64,
    pub location_interval_secs: u64,
    pub token_renewal_secs: u64,
    pub token_validity_secs: u64,
    pub approval: ApprovalMode,
    pub conflicts: ConflictHandling,
}

struct Spec {
    name: &'static str,
    default: &'static str,
    help: &'static str,
}

/// The settings an admin can change, in the order `settings show` lists them.
const SPECS: [Spec; 7] = [
    Spec {
        name: "enable_cmg",
        default: "yes",
        help: "clients may use a cloud management gateway (yes/no)",
    },
    Spec {
        name: "policy_interval",
        default: "60m",
        help: "how often clients poll policy",
    },
    Spec {
        name: "location_interval",
        default: "24h",
        help: "how often clients refresh their management point list",
    },
    Spec {
        name: "token_renewal",
        default: "30d",
        help: "clients renew a token older than this",
    },
    Spec {
        name: "token_validity",
        default: "90d",
        help: "validity of a client token (at least token_renewal)",
    },
    Spec {
        name: "approval",
        default: "automatic",
        help: "approval of new devices: automatic or manual",
    },
    Spec {
        name: "conflicting_records",
        default: "new-record",
        help: "same hardware, new certificate: new-record or take-over",
    },
];

impl Default for SiteSettings {
    fn default() -> Self {
        SiteSettings::from_pairs(std::iter::empty::<(String, String)>())
            .expect("the built-in defaults are valid")
    }
}

impl SiteSettings {
    /// Reads stored name/value pairs over the defaults. An unknown name (from a newer cmg) is
    /// ignored; a bad value is an error, since a role must not run on a guess.
    pub fn from_pairs<I, K, V>(pairs: I) -> Result<Self, SiteError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut values: BTreeMap<&str, String> = SPECS
            .iter()
            .map(|s| (s.name, s.default.to_owned()))
            .collect();
        for (name, value) in pairs {
            if let Some(spec) = SPECS.iter().find(|s| s.name == name.as_ref()) {
                values.insert(spec.name, value.as_ref().to_owned());
            }
        }
        let get = |name: &str| values.get(name).map(String::as_str).unwrap_or_default();
        let settings = SiteSettings {
            enable_cmg: parse_bool("enable_cmg", get("enable_cmg"))?,
            policy_interval_secs: parse_duration("policy_interval", get("policy_interval"))?,
            location_interval_secs: parse_duration("location_interval", get("location_interval"))?,
            token_renewal_secs: parse_duration("token_renewal", get("token_renewal"))?,
            token_validity_secs: parse_duration("token_validity", get("token_validity"))?,
            approval: match get("approval") {
                "automatic" => ApprovalMode::Automatic,
                "manual" => ApprovalMode::Manual,
                other => return Err(bad("approval", other, "automatic or manual")),
            },
            conflicts: match get("conflicting_records") {
                "new-record" => ConflictHandling::NewRecord,
                "take-over" => ConflictHandling::TakeOver,
                other => return Err(bad("conflicting_records", other, "new-record or take-over")),
            },
        };
        if settings.token_validity_secs < settings.token_renewal_secs {
            return Err(bad(
                "token_validity",
                get("token_validity"),
                "a duration at least as long as token_renewal",
            ));
        }
        Ok(settings)
    }

    /// Checks that `name = value` is a valid change on top of `current` (stored pairs) and returns
    /// the value in its canonical form, ready to store.
    pub fn validate_change(
        current: &[(String, String)],
        name: &str,
        value: &str,
    ) -> Result<String, SiteError> {
        let spec = SPECS
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| SiteError::BadSetting {
                name: name.chars().take(40).collect(),
                reason: format!(
                    "no such setting; the settings are {}",
                    SPECS.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
                ),
            })?;
        let value = value.trim().to_ascii_lowercase();
        let mut pairs: Vec<(String, String)> = current
            .iter()
            .filter(|(n, _)| n != spec.name)
            .cloned()
            .collect();
        pairs.push((spec.name.to_owned(), value.clone()));
        SiteSettings::from_pairs(pairs)?;
        Ok(value)
    }

    /// Every setting as `(name, value, description)`, with the stored value or the default.
    pub fn describe(stored: &[(String, String)]) -> Vec<(&'static str, String, &'static str)> {
        SPECS
            .iter()
            .map(|s| {
                let value = stored
                    .iter()
                    .find(|(n, _)| n == s.name)
                    .map_or_else(|| s.default.to_owned(), |(_, v)| v.clone());
                (s.name, value, s.help)
            })
            .collect()
    }

    /// What devices are told (`.sms_pol`).
    pub fn client_policy(&self) -> ClientPolicy {
        ClientPolicy {
            enable_cmg: self.enable_cmg,
            policy_interval_secs: self.policy_interval_secs,
            location_interval_secs: self.location_interval_secs,
            token_renewal_secs: self.token_renewal_secs,
            token_validity_secs: self.token_validity_secs,
        }
    }
}

fn bad(name: &str, value: &str, allowed: &str) -> SiteError {
    SiteError::BadSetting {
        name: name.to_owned(),
        reason: format!(
            "'{}' is not allowed; use {allowed}",
            value.chars().take(40).collect::<String>()
        ),
    }
}

fn parse_bool(name: &str, value: &str) -> Result<bool, SiteError> {
    match value {
        "yes" | "true" | "on" | "1" => Ok(true),
        "no" | "false" | "off" | "0" => Ok(false),
        other => Err(bad(name, other, "yes or no")),
    }
}

/// `90d`, `24h`, `60m` or `30s`: a positive whole number with a unit, at most 10 years.
fn parse_duration(name: &str, value: &str) -> Result<u64, SiteError> {
    let allowed = "a whole number with a unit s, m, h or d, e.g. 60m or 90d";
    let (number, unit) = value.split_at(value.len().saturating_sub(1));
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad(name, value, allowed)),
    };
    let n: u64 = number
        .parse()
        .ok()
        .filter(|n| *n > 0 && number.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| bad(name, value, allowed))?;
    n.checked_mul(scale)
        .filter(|secs| *secs <= 10 * 365 * 86_400)
        .ok_or_else(|| bad(name, value, "at most 10 years"))
}

impl fmt::Display for ApprovalMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ApprovalMode::Automatic => "automatic",
            ApprovalMode::Manual => "manual",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones() {
        let s = SiteSettings::default();
        assert!(s.enable_cmg);
        assert_eq!(s.policy_interval_secs, 3600);
        assert_eq!(s.location_interval_secs, 86_400);
        assert_eq!(s.token_renewal_secs, 30 * 86_400);
        assert_eq!(s.token_validity_secs, 90 * 86_400);
        assert_eq!(s.approval, ApprovalMode::Automatic);
        assert_eq!(s.conflicts, ConflictHandling::NewRecord);
    }

    #[test]
    fn changes_are_validated_against_the_other_settings() {
        let none: Vec<(String, String)> = vec![];
        assert_eq!(
            SiteSettings::validate_change(&none, "token_renewal", " 2M ").unwrap(),
            "2m"
        );
        assert_eq!(
            SiteSettings::validate_change(&none, "enable_cmg", "No").unwrap(),
            "no"
        );
        for (name, value) in [
            ("token_renewal", "0d"),
            ("token_renewal", "-1d"),
            ("token_renewal", "1.5d"),
            ("token_renewal", "30"),
            ("token_validity", "10d"),
            ("approval", "sometimes"),
            ("enable_cmg", "maybe"),
            ("nonsense", "1"),
        ] {
            assert!(
                SiteSettings::validate_change(&none, name, value).is_err(),
                "{name}={value}"
            );
        }
        let short = vec![("token_renewal".to_owned(), "1m".to_owned())];
        assert_eq!(
            SiteSettings::validate_change(&short, "token_validity", "5m").unwrap(),
            "5m"
        );
    }
}
