//! `cmg admin cmg …`: cloud management gateway definitions.

use std::path::Path;

use anyhow::Context;
use cmg_site::AdminService;
use cmg_site::cmg::{CmgDefinition, TUNNEL_BASE_PORT};

use crate::cli::{CmgCommand, CmgSettingsArgs};

fn read(path: &Path, what: &str) -> anyhow::Result<String> {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("pfx") || e.eq_ignore_ascii_case("p12"))
    {
        anyhow::bail!(
            "{} is a PFX file; give the certificate chain and key as PEM (e.g. `openssl pkcs12 -in {0} -nokeys -out server.crt` and `-nocerts -nodes -out server.key`)",
            path.display()
        );
    }
    std::fs::read_to_string(path).with_context(|| format!("cannot read {what} {}", path.display()))
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
            let mut def = CmgDefinition {
                name: args.name,
                tunnel_host: args.tunnel_host.unwrap_or_else(|| args.fqdn.clone()),
                fqdn: args.fqdn,
                instances: args.instances,
                server_chain_pem: read(&args.server_cert, "the server certificate")?,
                trusted_cas: Vec::new(),
                crl_check: true,
                min_tls: "1.2".into(),
                data_alert_gb: 10_000,
                stop_at_critical: false,
                device_port: args.device_port,
            };
            apply(&args.settings, &mut def)?;
            let key = read(&args.server_key, "the server key")?;
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
