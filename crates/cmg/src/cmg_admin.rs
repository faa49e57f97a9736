//! `cmg admin cmg …`: cloud management gateway definitions.

use std::path::Path;

use anyhow::Context;
use cmg_pki::pfx::PfxError;
use cmg_site::AdminService;
use cmg_site::cmg::{CmgDefinition, TUNNEL_BASE_PORT};

use crate::cli::{CmgCommand, CmgCreateArgs, CmgSettingsArgs};

/// Environment variable holding the PFX password when no password file is given (for
/// automation; a password is never a command-line value, which would show in `ps`).
const PFX_PASSWORD_ENV: &str = "CMG_PFX_PASSWORD";

fn is_pfx_name(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("pfx") || e.eq_ignore_ascii_case("p12"))
}

fn looks_like_pem(bytes: &[u8]) -> bool {
    bytes.windows(11).any(|w| w == b"-----BEGIN ")
}

/// A PEM file (certificates, a key). PFX files are refused here: only the server certificate
/// may be one (see [`server_credentials`]).
fn read(path: &Path, what: &str) -> anyhow::Result<String> {
    if is_pfx_name(path) {
        anyhow::bail!(
            "{} is a PFX file, but {what} must be PEM (convert it with `openssl pkcs12 -in {0} -nokeys -out ca.crt`); only --server-cert accepts a PFX file",
            path.display()
        );
    }
    std::fs::read_to_string(path).with_context(|| format!("cannot read {what} {}", path.display()))
}

/// The PFX password: the first line of `--server-cert-password-file`, else `CMG_PFX_PASSWORD`,
/// else none.
fn pfx_password(args: &CmgCreateArgs) -> anyhow::Result<Option<String>> {
    if let Some(file) = &args.server_cert_password_file {
        let bytes = std::fs::read(file)
            .with_context(|| format!("cannot read the password file {}", file.display()))?;
        let text = String::from_utf8(bytes).map_err(|_| {
            anyhow::anyhow!(
                "the password file {} is not UTF-8 text; save the password as UTF-8",
                file.display()
            )
        })?;
        let line = text.split('\n').next().unwrap_or_default();
        return Ok(Some(line.strip_suffix('\r').unwrap_or(line).to_owned()));
    }
    match std::env::var(PFX_PASSWORD_ENV) {
        Ok(password) => Ok(Some(password)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            anyhow::bail!("{PFX_PASSWORD_ENV} is not valid UTF-8")
        }
    }
}

/// The server certificate chain and private key (PEM) from `--server-cert`: a PFX file
/// (by its .pfx/.p12 name, or because it is not PEM) with the key inside, or PEM with
/// `--server-key`.
fn server_credentials(args: &CmgCreateArgs) -> anyhow::Result<(String, String)> {
    let path = &args.server_cert;
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read the server certificate {}", path.display()))?;
    let pem = looks_like_pem(&bytes);
    if is_pfx_name(path) || !pem {
        if let Some(key) = &args.server_key {
            anyhow::bail!(
                "--server-key {} cannot be used with the PFX file {}: the private key is taken from the PFX; leave --server-key out",
                key.display(),
                path.display()
            );
        }
        let password = pfx_password(args)?;
        return match cmg_pki::pfx::decode(&bytes, password.as_deref().unwrap_or_default()) {
            Ok(contents) => Ok((
                contents.chain_pem().to_owned(),
                contents.key_pem().to_owned(),
            )),
            Err(PfxError::WrongPassword | PfxError::DecryptionFailed { .. })
                if password.is_none() =>
            {
                anyhow::bail!(
                    "the PFX file {} needs a password and none was given: put it on the first line of a file and add --server-cert-password-file FILE, or set {PFX_PASSWORD_ENV}",
                    path.display()
                )
            }
            Err(e) if pem => anyhow::bail!(
                "cannot read the server certificate {}: {e} (the file looks like PEM: give it a .crt or .pem name and add --server-key)",
                path.display()
            ),
            Err(e) => anyhow::bail!(
                "cannot read the PFX server certificate {}: {e}",
                path.display()
            ),
        };
    }
    if let Some(file) = &args.server_cert_password_file {
        anyhow::bail!(
            "--server-cert-password-file {} is only for a PFX server certificate, and {} is PEM; leave it out",
            file.display(),
            path.display()
        );
    }
    let chain = String::from_utf8(bytes).map_err(|_| {
        anyhow::anyhow!(
            "the server certificate {} is neither a PFX file nor PEM text",
            path.display()
        )
    })?;
    let key_path = args.server_key.as_ref().ok_or_else(|| {
        anyhow::anyhow!(
            "--server-key FILE is required with the PEM server certificate {}; or give the certificate and its key as one PFX file",
            path.display()
        )
    })?;
    let key = read(key_path, "the server key")?;
    Ok((chain, key))
}

fn apply(settings: &CmgSettingsArgs, def: &mut CmgDefinition) -> anyhow::Result<()> {
    if !settings.trusted_cas.is_empty() {
        def.trusted_cas = settings
            .trusted_cas
            .iter()
            .map(|p| read(p, "the trusted CA"))
            .collect::<anyhow::Result<_>>()?;
    }
    if let Some(v) = settings.crl_check {
        def.crl_check = v;
    }
    if let Some(v) = &settings.min_tls {
        def.min_tls = v.clone();
    }
    if let Some(v) = settings.data_alert_gb {
        def.data_alert_gb = v;
    }
    if let Some(v) = settings.stop_at_critical {
        def.stop_at_critical = v;
    }
    Ok(())
}

fn show(def: &CmgDefinition) {
    println!("Name:                 {}", def.name);
    println!("FQDN:                 {}", def.fqdn);
    println!("Instances:            {}", def.instances);
    for (n, (host, port)) in def.tunnel_endpoints().iter().enumerate() {
        println!(
            "  instance {}: devices on port {}, tunnel at {host}:{port}",
            n + 1,
            def.device_port
        );
    }
    println!("Trusted CAs:          {}", def.trusted_cas.len());
    println!(
        "CRL check:            {}",
        if def.crl_check { "on" } else { "off" }
    );
    println!("Minimum TLS:          {}", def.min_tls);
    println!(
        "14-day data alert:    {} GB (warning at 50 %, critical at 90 %; stop at critical: {})",
        def.data_alert_gb,
        if def.stop_at_critical { "yes" } else { "no" }
    );
}

pub async fn run(admin: &AdminService, cmd: CmgCommand) -> anyhow::Result<()> {
    match cmd {
        CmgCommand::Create(args) => {
            let (server_chain_pem, key) = server_credentials(&args)?;
            let mut def = CmgDefinition {
                name: args.name,
                tunnel_host: args.tunnel_host.unwrap_or_else(|| args.fqdn.clone()),
                fqdn: args.fqdn,
                instances: args.instances,
                server_chain_pem,
                trusted_cas: Vec::new(),
                crl_check: true,
                min_tls: "1.2".into(),
                data_alert_gb: 10_000,
                stop_at_critical: false,
                device_port: args.device_port,
            };
            apply(&args.settings, &mut def)?;
            let (files, warnings) = admin.create_cmg(&def, &key).await?;
            for w in &warnings {
                eprintln!("warning: {w}");
            }
            println!("CMG {} created. Run each instance with:", def.name);
            for file in &files {
                println!("  cmg gateway run --config {}", file.display());
            }
            println!(
                "and the connection point on the site side with `cmg connector run --cmg {}`.",
                def.name
            );
            println!(
                "Tunnel ports: {}–{}.",
                TUNNEL_BASE_PORT,
                TUNNEL_BASE_PORT + u16::from(def.instances) - 1
            );
        }
        CmgCommand::Modify(args) => {
            let mut failure = None;
            let (def, warnings) = admin
                .modify_cmg(&args.name, |def| {
                    if let Some(n) = args.instances {
                        def.instances = n;
                    }
                    if let Err(e) = apply(&args.settings, def) {
                        failure = Some(e);
                    }
                })
                .await?;
            if let Some(e) = failure {
                return Err(e);
            }
            for w in &warnings {
                eprintln!("warning: {w}");
            }
            show(&def);
        }
        CmgCommand::Show { name } => {
            let def = admin.cmg(&name).await?;
            show(&def);
            let (traffic, level) = admin.cmg_traffic(&def.name).await?;
            println!("\nTraffic over the last 14 days:");
            println!(
                "  {:<28} {:>10} {:>16} {:>16}",
                "ENDPOINT", "REQUESTS", "BYTES IN", "BYTES OUT"
            );
            for t in &traffic {
                println!(
                    "  {:<28} {:>10} {:>16} {:>16}",
                    t.endpoint, t.requests, t.bytes_in, t.bytes_out
                );
            }
            let out: i64 = traffic.iter().map(|t| t.bytes_out).sum();
            println!(
                "Outbound data: {out} bytes of {} GB; alert: {}",
                def.data_alert_gb,
                level.as_str()
            );
        }
        CmgCommand::List => {
            println!("{:<20} {:<40} INSTANCES", "NAME", "FQDN");
            for def in admin.cmgs().await? {
                println!("{:<20} {:<40} {}", def.name, def.fqdn, def.instances);
            }
        }
        CmgCommand::Delete { name } => {
            admin.delete_cmg(&name).await?;
            println!("CMG {name} deleted.");
        }
    }
    Ok(())
}
