//! The ccmsetup command line (DESIGN §7): the documented syntax, verbatim —
//! `/mp:<url> CCMHOSTNAME=<host/path> SMSSiteCode=<code> /regtoken:<token> SMSMP=<url>
//! CCMALWAYSINF=1 /NoCRLCheck /UsePKICert` — with names case-insensitive, and the equivalent
//! plain flags (`--mp`, `--cmg`, `--site-code`, `--regtoken`, `--regtoken-file`,
//! `--always-internet`, `--trust-ca`, `--pki-cert`, `--pki-key`, `--state-dir`, `--service`,
//! `--resolve`).
//!
//! Parsing checks everything it can before anything is done: an unknown or conflicting property
//! is refused with its name and what to do. The bulk registration token is kept in a
//! [`BulkToken`], which never shows itself in `Debug` or in an error.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

/// The default state directory, relative to where the client is installed from.
pub const DEFAULT_STATE_DIR: &str = "cmg-client";

/// A bulk registration token. `Debug` and `Display` never show it; only [`BulkToken::expose`]
/// does, to put it in an `Authorization` header.
#[derive(Clone, PartialEq, Eq)]
pub struct BulkToken(String);

impl BulkToken {
    /// Checks the shape of a compact JWS (three base64url parts) without echoing the value.
    pub fn new(value: &str) -> Result<BulkToken, &'static str> {
        let value = value.trim();
        let parts: Vec<&str> = value.split('.').collect();
        if parts.len() != 3 || parts[..2].iter().any(|p| p.is_empty()) {
            return Err(
                "it is not a token: a bulk registration token has three parts separated by dots",
            );
        }
        let base64url = |p: &&str| {
            p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if !parts.iter().all(base64url) {
            return Err("it is not a token: the parts of a bulk registration token are base64url");
        }
        Ok(BulkToken(value.to_owned()))
    }

    /// The token itself, for the `Authorization: Bearer` header only. Never log or store it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for BulkToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BulkToken(<redacted>)")
    }
}

/// What `cmg client install` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallOptions {
    /// `/mp:` or `--mp`: the management point to install from: an intranet MP
    /// (`https://mp.contoso.com`) or a CMG URL (`https://<CMG>/CCM_Proxy_MutualAuth/<id>`).
    pub mp: Option<String>,
    /// `SMSMP=`: the intranet management point the client starts with.
    pub intranet_mp: Option<String>,
    /// `CCMHOSTNAME=` or `--cmg`: the internet MP, `<CMG>/CCM_Proxy_MutualAuth/<id>`, as an
    /// `https://` URL.
    pub cmg_url: Option<String>,
    /// `SMSSiteCode=` or `--site-code`: three letters or digits, upper case.
    pub site_code: String,
    /// `/regtoken:`, `--regtoken` or the contents of `--regtoken-file`.
    pub regtoken: Option<BulkToken>,
    /// `CCMALWAYSINF=1` or `--always-internet`.
    pub always_internet: bool,
    /// `/NoCRLCheck`: accepted for compatibility; the client checks no CRL for the gateway's
    /// server certificate (rustls never fetches CRLs).
    pub no_crl_check: bool,
    /// `/UsePKICert` (implied by `--pki-cert`): the PKI certificate is the client's identity.
    pub use_pki_cert: bool,
    pub pki_cert: Option<PathBuf>,
    pub pki_key: Option<PathBuf>,
    /// `--trust-ca FILE` (repeatable): roots for the gateway's and the MPs' server certificates.
    /// None: the system's roots.
    pub trust_ca: Vec<PathBuf>,
    /// `--state-dir`, default `./cmg-client`.
    pub state_dir: PathBuf,
    /// `--service FILE`: also write a systemd unit there that keeps `cmg client run` going.
    pub service: Option<PathBuf>,
    /// `--resolve HOST=IP:PORT` (repeatable): reach HOST at that address and port, whatever DNS
    /// says (a gateway on a non-standard port, as `cmg up` and tests run it).
    pub resolve: Vec<(String, SocketAddr)>,
    /// Overrides the hardware ID derived from the machine (tests: several clients on one host).
    pub hardware_id: Option<String>,
}

impl InstallOptions {
    /// Options with only a state directory and a site code: a base for programmatic callers.
    pub fn new(state_dir: impl Into<PathBuf>, site_code: &str) -> InstallOptions {
        InstallOptions {
            mp: None,
            intranet_mp: None,
            cmg_url: None,
            site_code: site_code.to_ascii_uppercase(),
            regtoken: None,
            always_internet: false,
            no_crl_check: false,
            use_pki_cert: false,
            pki_cert: None,
            pki_key: None,
            trust_ca: Vec::new(),
            state_dir: state_dir.into(),
            service: None,
            resolve: Vec::new(),
            hardware_id: None,
        }
    }

    /// The CMG URL to register through: `CCMHOSTNAME`, else `/mp:` when it is a CMG URL.
    pub fn gateway_url(&self) -> Option<&str> {
        self.cmg_url
            .as_deref()
            .or(self.mp.as_deref().filter(|u| is_gateway_url(u)))
    }

    /// The intranet MP to try first: `SMSMP`, else `/mp:` when it is not a CMG URL.
    pub fn intranet_url(&self) -> Option<&str> {
        self.intranet_mp
            .as_deref()
            .or(self.mp.as_deref().filter(|u| !is_gateway_url(u)))
    }

    /// Parses the arguments after `cmg client install`. A leading `ccmsetup.exe` (as pasted from
    /// the documentation) is skipped.
    pub fn parse(args: &[String]) -> Result<InstallOptions, SetupError> {
        let mut raw = Raw::default();
        let mut args = args.iter().map(String::as_str).peekable();
        if args.peek().is_some_and(|a| {
            let a = a.to_ascii_lowercase();
            a == "ccmsetup" || a.ends_with("ccmsetup.exe")
        }) {
            args.next();
        }
        while let Some(arg) = args.next() {
            if let Some(flag) = arg.strip_prefix("--") {
                let (name, inline) = match flag.split_once('=') {
                    Some((n, v)) => (n.to_ascii_lowercase(), Some(v.to_owned())),
                    None => (flag.to_ascii_lowercase(), None),
                };
                let display = format!("--{name}");
                if matches!(name.as_str(), "always-internet" | "no-crl-check") {
                    if inline.is_some() {
                        return Err(SetupError::invalid(
                            &display,
                            "it takes no value",
                            format!("write {display} alone"),
                        ));
                    }
                    raw.set_flag(&name);
                    continue;
                }
                let value = match inline {
                    Some(v) => v,
                    None => args
                        .next()
                        .map(str::to_owned)
                        .ok_or_else(|| SetupError::Missing {
                            property: display.clone(),
                            fix: format!("give a value after {display}"),
                        })?,
                };
                raw.set_flag_value(&name, &display, unquote(&value))?;
            } else if let Some(param) = arg.strip_prefix('/') {
                let (name, value) = match param.split_once(':') {
                    Some((n, v)) => (n.to_ascii_lowercase(), Some(unquote(v))),
                    None => (param.to_ascii_lowercase(), None),
                };
                raw.set_parameter(&name, value)?;
            } else if let Some((name, value)) = arg.split_once('=') {
                raw.set_property(name, unquote(value))?;
            } else {
                return Err(SetupError::Unknown {
                    argument: redact_argument(arg),
                });
            }
        }
        raw.finish()
    }
}

/// Why a command line was refused. Nothing was done.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SetupError {
    #[error(
        "unknown setup property or parameter '{argument}': use the ccmsetup syntax (/mp:, CCMHOSTNAME=, SMSSiteCode=, /regtoken:, SMSMP=, CCMALWAYSINF=1, /NoCRLCheck, /UsePKICert) or the flags (--mp, --cmg, --site-code, --regtoken, --regtoken-file, --always-internet, --trust-ca, --pki-cert, --pki-key, --state-dir, --service)"
    )]
    Unknown { argument: String },
    #[error("{property} is not valid: {reason}; {fix}")]
    Invalid {
        property: String,
        reason: String,
        fix: String,
    },
    #[error("{property} is missing: {fix}")]
    Missing { property: String, fix: String },
    #[error("{first} and {second} conflict: {fix}")]
    Conflict {
        first: String,
        second: String,
        fix: String,
    },
    #[error("cannot read {property} file {path}: {reason}; check the path and its permissions")]
    File {
        property: String,
        path: String,
        reason: String,
    },
}

impl SetupError {
    fn invalid(property: &str, reason: impl Into<String>, fix: impl Into<String>) -> SetupError {
        SetupError::Invalid {
            property: property.to_owned(),
            reason: reason.into(),
            fix: fix.into(),
        }
    }

    fn conflict(first: &str, second: &str, fix: impl Into<String>) -> SetupError {
        SetupError::Conflict {
            first: first.to_owned(),
            second: second.to_owned(),
            fix: fix.into(),
        }
    }
}

/// Where a value came from, to name it in an error.
#[derive(Debug, Clone)]
struct Given<T> {
    value: T,
    from: String,
}

#[derive(Default)]
struct Raw {
    mp: Option<Given<String>>,
    intranet_mp: Option<Given<String>>,
    cmg: Option<Given<String>>,
    site_code: Option<Given<String>>,
    regtoken: Option<Given<BulkToken>>,
    always_internet: Option<Given<bool>>,
    no_crl_check: bool,
    use_pki_cert: bool,
    pki_cert: Option<Given<PathBuf>>,
    pki_key: Option<Given<PathBuf>>,
    trust_ca: Vec<PathBuf>,
    state_dir: Option<Given<PathBuf>>,
    service: Option<Given<PathBuf>>,
    resolve: Vec<(String, SocketAddr)>,
}

/// Sets `slot` once; a second, different value is a conflict naming both sources.
fn set_once<T: PartialEq + Clone>(
    slot: &mut Option<Given<T>>,
    value: T,
    from: &str,
    what: &str,
) -> Result<(), SetupError> {
    match slot {
        Some(existing) if existing.value != value => Err(SetupError::conflict(
            &existing.from,
            from,
            format!("they name two different {what}; give one"),
        )),
        Some(_) => Ok(()),
        None => {
            *slot = Some(Given {
                value,
                from: from.to_owned(),
            });
            Ok(())
        }
    }
}

impl Raw {
    fn set_flag(&mut self, name: &str) {
        match name {
            "always-internet" => {
                self.always_internet = Some(Given {
                    value: true,
                    from: "--always-internet".into(),
                })
            }
            _ => self.no_crl_check = true,
        }
    }

    fn set_flag_value(
        &mut self,
        name: &str,
        display: &str,
        value: String,
    ) -> Result<(), SetupError> {
        match name {
            "mp" => set_once(
                &mut self.mp,
                mp_url(display, &value)?,
                display,
                "management points",
            ),
            "smsmp" | "intranet-mp" => set_once(
                &mut self.intranet_mp,
                mp_url(display, &value)?,
                display,
                "intranet management points",
            ),
            "cmg" => set_once(&mut self.cmg, cmg_url(display, &value)?, display, "CMGs"),
            "site-code" => set_once(
                &mut self.site_code,
                site_code(display, &value)?,
                display,
                "site codes",
            ),
            "regtoken" => self.set_token(display, &value),
            "regtoken-file" => {
                let text = std::fs::read_to_string(&value).map_err(|e| SetupError::File {
                    property: display.into(),
                    path: value.clone(),
                    reason: e.to_string(),
                })?;
                self.set_token(display, &text)
            }
            "trust-ca" => {
                self.trust_ca.push(PathBuf::from(value));
                Ok(())
            }
            "pki-cert" => {
                self.use_pki_cert = true;
                set_once(&mut self.pki_cert, value.into(), display, "certificates")
            }
            "pki-key" => set_once(&mut self.pki_key, value.into(), display, "keys"),
            "state-dir" => set_once(
                &mut self.state_dir,
                value.into(),
                display,
                "state directories",
            ),
            "service" => set_once(&mut self.service, value.into(), display, "unit files"),
            "resolve" => {
                let parsed = value.split_once('=').and_then(|(h, a)| {
                    Some((h.to_ascii_lowercase(), a.parse::<SocketAddr>().ok()?))
                });
                match parsed {
                    Some(entry) => {
                        self.resolve.push(entry);
                        Ok(())
                    }
                    None => Err(SetupError::invalid(
                        display,
                        "expected HOST=IP:PORT",
                        "e.g. --resolve cmg.contoso.com=127.0.0.1:8443",
                    )),
                }
            }
            _ => Err(SetupError::Unknown {
                argument: display.to_owned(),
            }),
        }
    }

    fn set_token(&mut self, from: &str, value: &str) -> Result<(), SetupError> {
        let token = BulkToken::new(value).map_err(|reason| {
            SetupError::invalid(
                from,
                reason,
                "copy the token exactly as `cmg bulk-token new` printed it",
            )
        })?;
        if let Some(existing) = &self.regtoken {
            return Err(SetupError::conflict(
                &existing.from,
                from,
                "give the bulk registration token once",
            ));
        }
        self.regtoken = Some(Given {
            value: token,
            from: from.to_owned(),
        });
        Ok(())
    }

    /// `/name[:value]`.
    fn set_parameter(&mut self, name: &str, value: Option<String>) -> Result<(), SetupError> {
        let display = format!("/{name}");
        let required = |value: Option<String>| {
            value
                .filter(|v| !v.is_empty())
                .ok_or_else(|| SetupError::Missing {
                    property: display.clone(),
                    fix: format!("write {display}:<value>"),
                })
        };
        match name {
            "mp" => {
                let value = required(value)?;
                set_once(
                    &mut self.mp,
                    mp_url("/mp", &value)?,
                    "/mp",
                    "management points",
                )
            }
            "regtoken" => {
                let value = required(value)?;
                self.set_token("/regtoken", &value)
            }
            "nocrlcheck" | "usepkicert" => {
                if value.is_some() {
                    return Err(SetupError::invalid(
                        &display,
                        "it takes no value",
                        format!("write {display} alone"),
                    ));
                }
                if name == "nocrlcheck" {
                    self.no_crl_check = true;
                } else {
                    self.use_pki_cert = true;
                }
                Ok(())
            }
            _ => Err(SetupError::Unknown { argument: display }),
        }
    }

    /// `NAME=value`.
    fn set_property(&mut self, name: &str, value: String) -> Result<(), SetupError> {
        match name.to_ascii_uppercase().as_str() {
            "CCMHOSTNAME" => set_once(
                &mut self.cmg,
                cmg_url("CCMHOSTNAME", &value)?,
                "CCMHOSTNAME",
                "CMGs",
            ),
            "SMSSITECODE" => set_once(
                &mut self.site_code,
                site_code("SMSSiteCode", &value)?,
                "SMSSiteCode",
                "site codes",
            ),
            "SMSMP" => set_once(
                &mut self.intranet_mp,
                mp_url("SMSMP", &value)?,
                "SMSMP",
                "intranet management points",
            ),
            "CCMALWAYSINF" => {
                let always = match value.as_str() {
                    "1" => true,
                    "0" => false,
                    _ => {
                        return Err(SetupError::invalid(
                            "CCMALWAYSINF",
                            "it must be 1 or 0",
                            "write CCMALWAYSINF=1 for a client that is always on the internet",
                        ));
                    }
                };
                set_once(
                    &mut self.always_internet,
                    always,
                    "CCMALWAYSINF",
                    "settings",
                )
            }
            _ => Err(SetupError::Unknown {
                argument: format!("{name}="),
            }),
        }
    }

    fn finish(self) -> Result<InstallOptions, SetupError> {
        let site_code = self
            .site_code
            .map(|g| g.value)
            .ok_or_else(|| SetupError::Missing {
                property: "SMSSiteCode".into(),
                fix: "add SMSSiteCode=<the three-character site code> (or --site-code)".into(),
            })?;
        if let (Some(mp), Some(cmg)) = (&self.mp, &self.cmg)
            && is_gateway_url(&mp.value)
            && !same_url(&mp.value, &cmg.value)
        {
            return Err(SetupError::conflict(
                &mp.from,
                &cmg.from,
                "they name two different CMG management points; give the same URL in both",
            ));
        }
        if let (Some(mp), Some(intranet)) = (&self.mp, &self.intranet_mp)
            && !is_gateway_url(&mp.value)
            && !same_url(&mp.value, &intranet.value)
        {
            return Err(SetupError::conflict(
                &mp.from,
                &intranet.from,
                "they name two different intranet management points; give one",
            ));
        }
        if let Some(intranet) = &self.intranet_mp
            && is_gateway_url(&intranet.value)
        {
            return Err(SetupError::invalid(
                &intranet.from,
                "it names a CMG URL, not an intranet management point",
                "give the CMG in CCMHOSTNAME=<CMG>/CCM_Proxy_MutualAuth/<id> and the intranet MP in SMSMP",
            ));
        }
        let always_internet = self.always_internet.is_some_and(|g| g.value);
        let mut options = InstallOptions {
            mp: self.mp.map(|g| g.value),
            intranet_mp: self.intranet_mp.map(|g| g.value),
            cmg_url: self.cmg.map(|g| g.value),
            site_code,
            regtoken: None,
            always_internet,
            no_crl_check: self.no_crl_check,
            use_pki_cert: self.use_pki_cert,
            pki_cert: self.pki_cert.map(|g| g.value),
            pki_key: self.pki_key.as_ref().map(|g| g.value.clone()),
            trust_ca: self.trust_ca,
            state_dir: self
                .state_dir
                .map(|g| g.value)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            service: self.service.map(|g| g.value),
            resolve: self.resolve,
            hardware_id: None,
        };
        if options.gateway_url().is_none() && options.intranet_url().is_none() {
            return Err(SetupError::Missing {
                property: "/mp".into(),
                fix: "give the management point: /mp:https://<CMG>/CCM_Proxy_MutualAuth/<id> with CCMHOSTNAME=<CMG>/CCM_Proxy_MutualAuth/<id>, or SMSMP=https://<intranet MP>".into(),
            });
        }
        if options.use_pki_cert && options.pki_cert.is_none() {
            return Err(SetupError::Missing {
                property: "--pki-cert".into(),
                fix: "/UsePKICert needs the certificate and its key: add --pki-cert FILE --pki-key FILE".into(),
            });
        }
        if options.use_pki_cert && options.pki_key.is_none() {
            return Err(SetupError::Missing {
                property: "--pki-key".into(),
                fix: "add --pki-key FILE with the private key (PKCS#8 PEM) of --pki-cert".into(),
            });
        }
        if let Some(key) = &self.pki_key
            && !options.use_pki_cert
        {
            return Err(SetupError::conflict(
                &key.from,
                "/UsePKICert",
                "--pki-key is only used with a PKI certificate: add --pki-cert FILE",
            ));
        }
        if let Some(token) = &self.regtoken
            && options.use_pki_cert
        {
            return Err(SetupError::conflict(
                &token.from,
                "/UsePKICert",
                "register either with the bulk registration token or with the PKI certificate; give one",
            ));
        }
        if always_internet && options.gateway_url().is_none() {
            return Err(SetupError::Missing {
                property: "CCMHOSTNAME".into(),
                fix: "a client that is always on the internet needs the CMG: add CCMHOSTNAME=<CMG>/CCM_Proxy_MutualAuth/<id>".into(),
            });
        }
        let needs_credential = options.intranet_url().is_none() || always_internet;
        if needs_credential && self.regtoken.is_none() && !options.use_pki_cert {
            return Err(SetupError::Missing {
                property: "/regtoken".into(),
                fix: "registering through a CMG needs a bulk registration token (/regtoken:<token> or --regtoken-file FILE) or a PKI certificate (/UsePKICert --pki-cert FILE --pki-key FILE)".into(),
            });
        }
        options.regtoken = self.regtoken.map(|g| g.value);
        Ok(options)
    }
}

fn unquote(value: &str) -> String {
    let v = value.trim();
    v.strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(v)
        .to_owned()
}

/// The name part of an unknown argument: its value may be a secret.
fn redact_argument(arg: &str) -> String {
    let cut = arg.find([':', '=']).unwrap_or(arg.len()).min(40);
    let name: String = arg.chars().take(cut).collect();
    if name.len() < arg.len() {
        format!("{name}…")
    } else {
        name
    }
}

/// True for `https://<CMG>/CCM_Proxy_MutualAuth/<id>` (or `CCM_Proxy_ServerAuth`).
pub fn is_gateway_url(url: &str) -> bool {
    let lower = url.to_ascii_lowercase();
    lower.contains("/ccm_proxy_mutualauth/") || lower.contains("/ccm_proxy_serverauth/")
}

fn same_url(a: &str, b: &str) -> bool {
    a.trim_end_matches('/')
        .eq_ignore_ascii_case(b.trim_end_matches('/'))
}

fn site_code(property: &str, value: &str) -> Result<String, SetupError> {
    if value.eq_ignore_ascii_case("AUTO") {
        return Err(SetupError::invalid(
            property,
            "AUTO needs Active Directory site assignment, which cmg does not do",
            format!("give the site code, e.g. {property}=ABC"),
        ));
    }
    if value.len() != 3 || !value.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(SetupError::invalid(
            property,
            format!("'{value}' is not a site code (three letters or digits)"),
            format!("give the site code, e.g. {property}=ABC"),
        ));
    }
    Ok(value.to_ascii_uppercase())
}

/// An `https://` URL with a host, without a trailing slash.
fn mp_url(property: &str, value: &str) -> Result<String, SetupError> {
    let fix = || format!("give an HTTPS URL, e.g. {property}=https://mp.contoso.com");
    let Some(rest) = strip_prefix_ci(value, "https://") else {
        let reason = if strip_prefix_ci(value, "http://").is_some() {
            "cmg management points speak HTTPS only".to_owned()
        } else {
            format!("'{value}' is not an https:// URL")
        };
        return Err(SetupError::invalid(property, reason, fix()));
    };
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(SetupError::invalid(
            property,
            format!("'{value}' has no host name"),
            fix(),
        ));
    }
    if is_gateway_url(value) {
        check_gateway_path(property, rest)?;
    }
    Ok(format!("https://{}", rest.trim_end_matches('/')))
}

/// `CCMHOSTNAME` / `--cmg`: `<CMG>/CCM_Proxy_MutualAuth/<id>`, with or without `https://`.
fn cmg_url(property: &str, value: &str) -> Result<String, SetupError> {
    if strip_prefix_ci(value, "http://").is_some() {
        return Err(SetupError::invalid(
            property,
            "a CMG speaks HTTPS only",
            format!("write {property}=<CMG>/CCM_Proxy_MutualAuth/<id>"),
        ));
    }
    let rest = strip_prefix_ci(value, "https://").unwrap_or(value);
    check_gateway_path(property, rest)?;
    Ok(format!("https://{}", rest.trim_end_matches('/')))
}

fn check_gateway_path(property: &str, rest: &str) -> Result<(), SetupError> {
    let fix = format!("write {property}=<CMG FQDN>/CCM_Proxy_MutualAuth/<MP role ID>");
    let mut parts = rest.trim_end_matches('/').split('/');
    let host = parts.next().unwrap_or_default();
    let proxy = parts.next().unwrap_or_default();
    let id = parts.next().unwrap_or_default();
    if host.is_empty()
        || !(proxy.eq_ignore_ascii_case("CCM_Proxy_MutualAuth")
            || proxy.eq_ignore_ascii_case("CCM_Proxy_ServerAuth"))
        || id.is_empty()
        || !id.bytes().all(|b| b.is_ascii_digit())
        || parts.next().is_some()
    {
        return Err(SetupError::invalid(
            property,
            format!("'{rest}' is not a CMG management point (host/CCM_Proxy_MutualAuth/<number>)"),
            fix,
        ));
    }
    Ok(())
}

fn strip_prefix_ci<'a>(value: &'a str, prefix: &str) -> Option<&'a str> {
    let head = value.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| value.get(prefix.len()..))
        .flatten()
}
