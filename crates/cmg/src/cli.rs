//! The command line. Every command and flag has help text (`cmg help <command>`).

use std::path::PathBuf;

use clap::builder::TypedValueParser as _;
use clap::{Args, Parser, Subcommand};
use cmg_site::{BulkTokenLifetime, ConnectionPointName, InventoryKind, KeyAlgorithm, SiteCode};

#[derive(Debug, Parser)]
#[command(
    name = "cmg",
    version,
    about = "Cloud management gateway with token-based device authentication",
    long_about = "cmg lets an organisation manage devices on the internet through a gateway, with \
                  devices authenticated by PKI certificates or site-issued tokens."
)]
pub struct Cli {
    /// The site's data directory (keys, certificates, site.toml, embedded database, logs).
    #[arg(
        long,
        global = true,
        env = "CMG_DATA",
        default_value = "./cmg-data",
        value_name = "DIR"
    )]
    pub data: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Everything on this machine: site, management point, connection point and gateway, on
    /// the embedded database with a development CA; prints a bulk token and the client install
    /// command, then `ready`. Ctrl-C stops every role.
    Up(UpArgs),
    /// Create and inspect the site: keys, certificates, database.
    #[command(subcommand)]
    Site(SiteCommand),
    /// Bulk registration tokens for devices that never touch the internal network.
    /// Also accepts the tool's own syntax: `cmg bulk-token /new [/lifetime MIN]`, `/?`.
    #[command(subcommand)]
    BulkToken(BulkTokenCommand),
    /// Site administration.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// The connection point: tunnels from the site out to the gateway instances.
    #[command(subcommand)]
    Connector(ConnectorCommand),
    /// A cloud management gateway instance (internet-facing).
    #[command(subcommand)]
    Gateway(GatewayCommand),
    /// The client: install (ccmsetup), the agent (ccmexec), status, uninstall.
    #[command(subcommand)]
    Client(ClientCommand),
}

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Install and register a client. Takes the ccmsetup syntax — `/mp:URL CCMHOSTNAME=…
    /// SMSSiteCode=ABC /regtoken:TOKEN SMSMP=URL CCMALWAYSINF=1 /NoCRLCheck /UsePKICert` — and
    /// flags: --mp, --cmg, --site-code, --regtoken, --regtoken-file, --always-internet,
    /// --trust-ca FILE, --pki-cert FILE, --pki-key FILE, --state-dir DIR, --service FILE.
    Install {
        /// The installation properties, as above.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "PROPERTIES"
        )]
        args: Vec<String>,
    },
    /// Run the agent until Ctrl-C: location, token renewal, policy, status messages.
    Run {
        #[arg(long, default_value = "./cmg-client", value_name = "DIR")]
        state_dir: PathBuf,
    },
    /// Show the client ID, connection type, management points, token expiry.
    Status {
        #[arg(long, default_value = "./cmg-client", value_name = "DIR")]
        state_dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove the client's key, certificate, token and state.
    Uninstall {
        #[arg(long, default_value = "./cmg-client", value_name = "DIR")]
        state_dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum GatewayCommand {
    /// Run one gateway instance until Ctrl-C, with the configuration `cmg admin cmg create` wrote.
    Run {
        /// The instance's configuration file (instance-N.toml).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Site code for a new site (an existing site keeps its own).
    #[arg(long, value_name = "CODE", default_value = "ABC", value_parser = parse_site_code)]
    pub site_code: SiteCode,
    /// Device HTTPS port of gateway instance 1 (instance n: +n−1).
    #[arg(long, default_value_t = 4443)]
    pub gateway_port: u16,
    /// Management point HTTPS port.
    #[arg(long, default_value_t = 8443)]
    pub mp_port: u16,
    /// Tunnel port of gateway instance 1 (instance n: +n−1).
    #[arg(long, default_value_t = 10140)]
    pub tunnel_port: u16,
    /// Gateway instances, 1–16.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=16))]
    pub instances: u8,
}

#[derive(Debug, Subcommand)]
pub enum ConnectorCommand {
    /// Dial out to every instance of a CMG and relay its device traffic to the management
    /// points, until Ctrl-C or SIGTERM, which closes the tunnels gracefully: the gateways send
    /// new requests to other connection points and the ones in flight are answered first (at
    /// most 30 s; a second Ctrl-C stops at once). Reads no private key of the site: --data is
    /// the site's data directory on the site server, or on another host the directory written
    /// by `cmg admin connector add`. Stops with an error if the connection point is removed.
    Run {
        /// The CMG to serve; default: the site's only CMG.
        #[arg(long)]
        cmg: Option<String>,
        /// A CA certificate (PEM) the gateways' server certificates chain to, when their chain
        /// does not include it (e.g. a public CA). Repeatable.
        #[arg(long = "gateway-root", value_name = "FILE")]
        gateway_roots: Vec<PathBuf>,
        /// Log every relayed request's internal URL (`Switched to internal URL …`).
        #[arg(long)]
        verbose: bool,
        /// Tunnels (TLS connections) kept to each gateway instance, 1–16: one tunnel is framed
        /// and encrypted on one core at each end, so busy CMGs want about one per core.
        #[arg(long, value_name = "N", default_value_t = cmg_connector::TUNNELS_PER_INSTANCE,
              value_parser = clap::value_parser!(u16).range(1..=cmg_connector::MAX_TUNNELS_PER_INSTANCE as i64).map(usize::from))]
        tunnels: usize,
    },
}

#[derive(Debug, Subcommand)]
pub enum SiteCommand {
    /// Create a new site: site issuing root, token signing, management point and connection
    /// point certificates, the hierarchy ID and the database.
    Init(InitArgs),
    /// Run the site server with its management point (HTTPS, "Enhanced HTTP") until Ctrl-C.
    Run(RunArgs),
    /// Print the site's token verification keys as a JWKS document.
    Jwks,
    /// Rotate or retire the token signing certificate.
    #[command(subcommand)]
    TokenKey(TokenKeyCommand),
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// The site code: exactly three letters or digits.
    #[arg(long, value_name = "CODE", value_parser = parse_site_code)]
    pub site_code: SiteCode,
    /// Key type of the token signing certificate: ecdsa-p256 (ES256 tokens) or rsa-2048 (RS256).
    #[arg(long, value_name = "ALG", default_value = "ecdsa-p256", value_parser = parse_key_alg)]
    pub token_key: KeyAlgorithm,
    /// Site database URL: sqlite://PATH or postgres://USER@HOST/DB. Default: the embedded
    /// SQLite database in the data directory.
    #[arg(long, value_name = "URL")]
    pub db: Option<String>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Address the management point listens on.
    #[arg(long, value_name = "ADDR", default_value = cmg_site::DEFAULT_MP_LISTEN)]
    pub mp_listen: std::net::SocketAddr,
    /// Role ID of the management point to serve (`cmg admin mp list`); default: the first.
    #[arg(long = "mp", value_name = "ROLE_ID")]
    pub mp_role_id: Option<i64>,
}

#[derive(Debug, Subcommand)]
pub enum TokenKeyCommand {
    /// Add a new token signing certificate that signs from now on. The old one keeps verifying
    /// until every token it signed has expired (90 days), then retires by itself.
    Rotate {
        /// Key type of the new certificate.
        #[arg(long, value_name = "ALG", default_value = "ecdsa-p256", value_parser = parse_key_alg)]
        token_key: KeyAlgorithm,
    },
    /// Stop publishing a previous token signing certificate now; tokens it signed stop working.
    Retire {
        /// Its SHA-256 thumbprint, as `cmg bulk-token list` shows it (base64url: it may start
        /// with '-').
        #[arg(allow_hyphen_values = true)]
        kid: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum BulkTokenCommand {
    /// Create a bulk registration token (`/new`). Prints its GUID, its expiry and the token.
    /// The token is not stored anywhere: copy it now.
    New {
        /// Validity in whole minutes, 1–10080 (7 days). Default 4320 (3 days). (`/lifetime`)
        #[arg(long, value_name = "MIN", default_value = "4320", allow_hyphen_values = true,
              value_parser = parse_lifetime)]
        lifetime: BulkTokenLifetime,
    },
    /// List the site's certificates and bulk registration tokens with their status.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Show one type only: bulk, root, signing, mp or connector.
        #[arg(long = "type", value_name = "TYPE", value_parser = parse_kind)]
        kind: Option<InventoryKind>,
    },
    /// Block a bulk registration token: devices can no longer register with it.
    Block {
        /// The token's GUID, as `new` printed it and `list` shows it.
        guid: String,
    },
    /// Unblock a bulk registration token.
    Unblock {
        /// The token's GUID.
        guid: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Registered devices: list, show, block, unblock, approve, conflicting records.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Client and site settings (CMG use, intervals, token validity, approval, conflicts).
    #[command(subcommand)]
    Settings(SettingsCommand),
    /// Management points of the site.
    #[command(subcommand)]
    Mp(MpCommand),
    /// Cloud management gateways: create, modify, show, list, delete.
    #[command(subcommand)]
    Cmg(CmgCommand),
    /// Connection points on other site-side hosts: add, list, remove.
    #[command(subcommand)]
    Connector(ConnectorAdminCommand),
    /// Show who changed what on the site, newest first.
    Audit {
        /// How many entries.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// List registered devices.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one device.
    Show {
        /// Client ID as listed, e.g. GUID:0C2D1D3A-….
        client_id: String,
    },
    /// Block a device: its token is refused at once, everywhere.
    Block { client_id: String },
    /// Unblock a device.
    Unblock { client_id: String },
    /// Approve a device that registered while approval is manual.
    Approve { client_id: String },
    /// List conflicting records: the same hardware registered with another certificate.
    Conflicts {
        /// Include conflicts already resolved.
        #[arg(long)]
        all: bool,
    },
    /// Merge a conflicting record into the record it conflicts with (that client ID takes the
    /// new certificate).
    Merge {
        /// Client ID of the new, conflicting record.
        client_id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum SettingsCommand {
    /// Show every setting with its value and meaning.
    Show,
    /// Change a setting, e.g. `set token_renewal 30d` or `set approval manual`.
    Set { name: String, value: String },
}

#[derive(Debug, Subcommand)]
pub enum MpCommand {
    /// List management points.
    List,
    /// Add a management point.
    Add {
        /// A name for admins, e.g. MP2.
        #[arg(long)]
        name: String,
        /// Its intranet URL, https://HOST[:PORT].
        #[arg(long)]
        url: String,
        /// Allow traffic from cloud management gateways to reach it.
        #[arg(long, default_value = "yes", value_parser = parse_yes_no)]
        allow_cmg: bool,
        /// Role ID; default: a new one.
        #[arg(long)]
        role_id: Option<i64>,
    },
    /// Change a management point's URL or whether it allows CMG traffic.
    Set {
        role_id: i64,
        #[arg(long)]
        url: Option<String>,
        #[arg(long, value_parser = parse_yes_no)]
        allow_cmg: Option<bool>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConnectorAdminCommand {
    /// Add a connection point for another site-side host: issue its certificate from the site
    /// root, make the management points believe the device identities it relays, and write DIR
    /// to copy to that host — site.toml (the same database), the site root certificate, its own
    /// certificate and key (0600) and logs/, none of the site's private keys. Run it there with
    /// `cmg connector run --data DIR`; the site database must be reachable from there
    /// (PostgreSQL).
    Add {
        /// Its name, e.g. the host's name: 1–63 letters, digits, '-', '_' or '.'.
        #[arg(long, value_parser = parse_connector_name)]
        name: ConnectionPointName,
        /// The directory to write: new or empty; created readable by its owner only (0700).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The connection point runs on this machine. Required when the site database is the
        /// embedded SQLite file, which another host cannot share.
        #[arg(long)]
        same_host: bool,
    },
    /// List the site's connection points: name, certificate thumbprint, valid until, status.
    /// The site server's own one is listed as "(site server)".
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove a connection point added with `add`: its certificate is retired, management
    /// points stop believing what it relays within about a second, and it closes its tunnels.
    Remove {
        /// Its name, as `list` shows it (any case).
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum CmgCommand {
    /// Define a CMG and write each instance's ready-to-run configuration.
    Create(CmgCreateArgs),
    /// Change a CMG's settings; running gateways receive them without a restart.
    Modify(CmgModifyArgs),
    /// Show a CMG's settings.
    Show { name: String },
    /// List the site's CMGs.
    List,
    /// Delete a CMG definition.
    Delete { name: String },
}

#[derive(Debug, Args)]
pub struct CmgCreateArgs {
    /// Service name, e.g. GraniteFalls.
    #[arg(long)]
    pub name: String,
    /// The name devices connect to; the server certificate must cover it (wildcards allowed).
    #[arg(long)]
    pub fqdn: String,
    /// Server authentication certificate: a PFX/PKCS#12 file (.pfx, .p12) with the chain and
    /// private key, as Windows and `openssl pkcs12 -export` write it (AES encryption), or PEM
    /// (leaf first, CA certificates after it) together with --server-key.
    #[arg(long, value_name = "FILE")]
    pub server_cert: PathBuf,
    /// The private key (PEM) of a PEM --server-cert. Not with a PFX: its key is inside.
    #[arg(long, value_name = "FILE")]
    pub server_key: Option<PathBuf>,
    /// File whose first line is the PFX password (never give a password on the command line:
    /// it would show in the process list). Default: the CMG_PFX_PASSWORD environment variable,
    /// else no password.
    #[arg(long, value_name = "FILE")]
    pub server_cert_password_file: Option<PathBuf>,
    /// Gateway instances, 1–16.
    #[arg(long, default_value_t = 1)]
    pub instances: u8,
    /// Host the connection point dials for the tunnels; default: the FQDN.
    #[arg(long)]
    pub tunnel_host: Option<String>,
    /// Device HTTPS port of every instance.
    #[arg(long, default_value_t = 443)]
    pub device_port: u16,
    #[command(flatten)]
    pub settings: CmgSettingsArgs,
}

#[derive(Debug, Args)]
pub struct CmgSettingsArgs {
    /// A trusted root or intermediate CA for PKI client certificates (PEM). Repeatable.
    #[arg(long = "trusted-ca", value_name = "FILE")]
    pub trusted_cas: Vec<PathBuf>,
    /// Check client certificates against CRLs.
    #[arg(long, value_parser = parse_yes_no)]
    pub crl_check: Option<bool>,
    /// Minimum TLS version, 1.2 or 1.3.
    #[arg(long)]
    pub min_tls: Option<String>,
    /// 14-day outbound data alert threshold in GB.
    #[arg(long)]
    pub data_alert_gb: Option<u64>,
    /// Stop the service at the critical threshold.
    #[arg(long, value_parser = parse_yes_no)]
    pub stop_at_critical: Option<bool>,
}

#[derive(Debug, Args)]
pub struct CmgModifyArgs {
    pub name: String,
    /// Gateway instances, 1–16.
    #[arg(long)]
    pub instances: Option<u8>,
    #[command(flatten)]
    pub settings: CmgSettingsArgs,
}

fn parse_yes_no(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "yes" | "true" | "on" => Ok(true),
        "no" | "false" | "off" => Ok(false),
        _ => Err(format!("'{s}': use yes or no")),
    }
}

fn parse_site_code(s: &str) -> Result<SiteCode, String> {
    s.parse().map_err(|e: cmg_site::SiteError| e.to_string())
}

fn parse_connector_name(s: &str) -> Result<ConnectionPointName, String> {
    s.parse().map_err(|e: cmg_site::SiteError| e.to_string())
}

fn parse_key_alg(s: &str) -> Result<KeyAlgorithm, String> {
    s.parse()
}

fn parse_lifetime(s: &str) -> Result<BulkTokenLifetime, String> {
    s.parse().map_err(|e: cmg_site::SiteError| e.to_string())
}

fn parse_kind(s: &str) -> Result<InventoryKind, String> {
    s.parse()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thumbprint_starting_with_a_hyphen_is_a_value_not_a_flag() {
        let cli = Cli::try_parse_from(["cmg", "site", "token-key", "retire", "-YcpSRLpRw5l_Sd2g"]);
        match cli.map(|c| c.command) {
            Ok(Command::Site(SiteCommand::TokenKey(TokenKeyCommand::Retire { kid }))) => {
                assert_eq!(kid, "-YcpSRLpRw5l_Sd2g")
            }
            other => panic!("{other:?}"),
        }
    }
}
